"""Rotary embedding module: the default RoPE, or any RoPE scaling transformers knows (linear, dynamic, yarn,
llama3, longrope), read from ``config.rope_parameters`` through transformers' own RoPE utilities."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from ..ops.rope import rope_cos_sin, rope_inv_freq

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """cos/sin ``[B, T, head_dim]`` for ``position_ids`` (a stride-0 batch when the positions are an
    expanded single row); scaled RoPE types also scale cos/sin by the ``attention_scaling`` their
    transformers init function returns (yarn, longrope)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters: unknown rope_type {self.rope_type!r}; "
                             f"known: {['default', *sorted(ROPE_INIT_FUNCTIONS)]}")
        # read by transformers' dynamic_rope_update
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device: torch.device | None = None, **kwargs):
        """Plain RoPE: ``(inv_freq, 1.0)`` (the name transformers' weight init looks for)."""
        theta = (config.rope_parameters or {}).get("rope_theta", config.rope_theta)
        return rope_inv_freq(config.head_dim, float(theta), device), 1.0

    def compute_inv_freq(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        """``(inv_freq [head_dim // 2], attention_scaling)`` for the config's RoPE type."""
        if self.rope_type == "default":
            return self.compute_default_rope_parameters(self.config, device)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)
        return inv_freq.float(), float(scaling)

    @torch.no_grad()
    @dynamic_rope_update  # dynamic NTK and longrope recompute inv_freq from the sequence length
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = position_ids.shape[0]
        # positions shared by every row (an expanded [1, T]: the model's default): one row of cos/sin,
        # expanded with a stride-0 batch, not B copies ([B, T, D] fp32 each, 256 MiB at B 32, T 16k)
        shared = B > 1 and position_ids.dim() == 2 and position_ids.stride(0) == 0
        cos, sin = rope_cos_sin(position_ids[:1] if shared else position_ids, self.inv_freq, torch.float32)
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # before the expand: .to would materialise it
        return (cos.expand(B, -1, -1), sin.expand(B, -1, -1)) if shared else (cos, sin)
