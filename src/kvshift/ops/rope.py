"""Rotary position embeddings (the rotate-half convention of Hugging Face Llama)."""

from __future__ import annotations

import torch

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "rotate_half"]


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``[head_dim // 2]`` inverse frequencies ``theta ** (-2i / head_dim)`` in fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, T, head_dim]`` for integer ``position_ids`` ``[B, T]`` (computed in fp32)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by cos/sin ``[B, T, D]``."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
