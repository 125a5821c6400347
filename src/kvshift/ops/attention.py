"""Scaled dot-product attention over the layouts used in kvshift (SDPA, GQA without copies)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, Hq, T, D]`` over ``k``/``v`` ``[B, Hkv, S, D]``.

    ``mask`` is a boolean ``[B, 1, T, S]`` (True = attend) or an additive float mask; with no mask the
    usual causal mask is used (which needs ``T == S`` or ``T == 1``).
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Hq != Hkv:
        # Expanding views keeps SDPA on its fused kernels on every backend (enable_gqa is not everywhere).
        rep = Hq // Hkv
        B, _, S, D = k.shape
        k = k[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, Hq, S, D)
        v = v[:, :, None].expand(B, Hkv, rep, S, v.shape[-1]).reshape(B, Hq, S, v.shape[-1])
    is_causal = mask is None and q.shape[2] > 1
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError("attention without a mask needs as many queries as keys (or a single query)")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
