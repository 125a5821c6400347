"""Pure tensor functions (no modules): the KV shift, RoPE and attention."""

from .kv_shift import kv_shift, kv_shift_ref

__all__ = ["kv_shift", "kv_shift_ref"]
