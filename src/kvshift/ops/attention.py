"""Attention over transformers' attention interface: an eager backend of our own (it returns the weights)
and the registered ones (sdpa, flex_attention, flash_attention_2, ...), chosen by ``config._attn_implementation``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["attention", "eager_attention", "attention_backend"]


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * groups, S, D]`` as an expanded view (no copy before the matmul)."""
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out: ``q`` ``[B, H, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]``, an additive or
    boolean ``[B, 1, T, S]`` mask (None = causal when ``T == S``). Returns ``([B, T, H, D], [B, H, T, S])``."""
    groups = query.shape[1] // key.shape[1]
    k, v = _expand_kv(key, groups), _expand_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if attention_mask is None and query.shape[2] > 1:
        T, S = query.shape[2], k.shape[2]
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def attention_backend(name: str | None) -> Callable:
    """The attention function registered under ``name`` in transformers (``eager`` is ours)."""
    if name in (None, "eager"):
        return eager_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal SDPA of ``q`` ``[B, Hq, T, D]`` over ``k``/``v`` ``[B, Hkv, S, D]`` -> ``[B, Hq, T, D]``.

    ``mask`` is a boolean ``[B, 1, T, S]`` (True = attend) or an additive float mask; with no mask the
    usual causal mask is used (which needs ``T == S`` or ``T == 1``).
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    # Expanding views keeps SDPA on its fused kernels on every backend (enable_gqa is not everywhere).
    k, v = _expand_kv(k, Hq // Hkv), _expand_kv(v, Hq // Hkv)
    is_causal = mask is None and q.shape[2] > 1
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError("attention without a mask needs as many queries as keys (or a single query)")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
