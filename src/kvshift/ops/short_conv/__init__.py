"""Causal short convolution over the last ``W`` tokens, per head or per channel: the generalised KV shift.

``short_conv(x, weight)`` with ``weight`` ``[H, 2]`` is exactly :func:`kvshift.kv_shift` (tested); wider
windows and per-channel weights cover the paper's window-3 ablation and Primer / Canon-style
convolutions. ``short_conv_ref`` (reference.py) is the literal definition, as loops.
"""

from __future__ import annotations

import torch

from .checks import lag_keep_masks, validate_short_conv_args
from .reference import short_conv_ref

__all__ = ["short_conv", "short_conv_ref"]


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = sum_j weight[..., j] * x_{t-j}`` with zero predecessors across document starts, padding and
    sequence starts (see :mod:`kvshift.ops.short_conv.reference`).

    Args:
        x: ``[B, T, H, D]`` raw inputs (e.g. keys after the projection, before RoPE).
        weight: ``[H, W]`` per head or ``[H, D, W]`` per channel; column ``j`` multiplies the token ``j``
            steps back (column 0: the current token). ``W`` is the window.
        cu_seqlens, attention_mask, reset_mask: as in :func:`kvshift.kv_shift`.
        prev: ``[B, W - 1, H, D]`` raw rows before position 0, oldest first (decode, chunked prefill).

    Returns a tensor shaped and typed like ``x``; differentiable in ``x``, ``weight`` and ``prev``.
    """
    validate_short_conv_args(x, weight, cu_seqlens, attention_mask, prev, reset_mask)
    B, T, H, D = x.shape
    W = weight.shape[-1]
    cdt = torch.promote_types(x.dtype, weight.dtype)
    xc, w = x.to(cdt), weight.to(cdt)
    cols = (w.view(1, 1, H, 1, W) if w.dim() == 2 else w.view(1, 1, H, D, W)).unbind(-1)
    y = xc * cols[0]
    if W == 1:
        return y.to(x.dtype)
    head = prev.to(cdt) if prev is not None else xc.new_zeros(B, W - 1, H, D)
    xp = torch.cat([head, xc], dim=1)  # [B, W - 1 + T, H, D]
    keeps = lag_keep_masks(B, T, W, x.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                           has_prev=prev is not None, reset_mask=reset_mask)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    for j in range(1, W):
        lag = xp[:, W - 1 - j: W - 1 - j + T]
        if keeps[j - 1] is not None:  # where, not a multiply: a NaN in a padded row must not leak
            lag = torch.where(keeps[j - 1][:, :, None, None], lag, zero)
        y = y + lag * cols[j]
    return y.to(x.dtype)
