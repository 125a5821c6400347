"""Pure tensor functions (no modules): the KV shift, its generalisation (a causal short convolution), RoPE and
attention."""

from .kv_shift import kv_shift, kv_shift_ref
from .short_conv import short_conv, short_conv_ref

__all__ = ["kv_shift", "kv_shift_ref", "short_conv", "short_conv_ref"]
