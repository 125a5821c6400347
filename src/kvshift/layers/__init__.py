"""nn.Modules built from the ops: KV-shifting attention, SwiGLU MLP, RMSNorm, decoder block."""

from .attention import KVShiftAttention
from .block import DecoderLayer
from .mlp import MLP
from .norm import RMSNorm

__all__ = ["KVShiftAttention", "DecoderLayer", "MLP", "RMSNorm"]
