"""Argument checks of the short convolution (once per public call) and its boundary rule."""

from __future__ import annotations

import torch

from ..kv_shift.checks import _shape, validate_cu_seqlens

__all__ = ["validate_short_conv_args", "document_starts", "lag_keep_masks", "MAX_WINDOW"]

MAX_WINDOW = 8


def validate_short_conv_args(x, weight, cu_seqlens=None, attention_mask=None, prev=None, reset_mask=None) -> None:
    """Raise ``ValueError`` naming the argument when an input of :func:`short_conv` is malformed."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D floating-point tensor [B, T, H, D], got {_shape(x)}")
    B, T, H, D = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3) or weight.shape[0] != H or (
            weight.dim() == 3 and weight.shape[1] != D):
        raise ValueError(f"weight must be [H, W] (per head) or [H, D, W] (per channel) with H = {H}, D = {D}, "
                         f"got {_shape(weight)}")
    W = weight.shape[-1]
    if not 1 <= W <= MAX_WINDOW:
        raise ValueError(f"weight's last dim is the window W, 1 <= W <= {MAX_WINDOW}, got {W}")
    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, B, T)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != (B, T)):
        raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}], got {_shape(attention_mask)}")
    if prev is not None and (not isinstance(prev, torch.Tensor) or tuple(prev.shape) != (B, W - 1, H, D)):
        raise ValueError(f"prev must have shape [B, W - 1, H, D] = [{B}, {W - 1}, {H}, {D}] (the last W - 1 raw "
                         f"rows, oldest first), got {_shape(prev)}")
    if reset_mask is not None and (not isinstance(reset_mask, torch.Tensor) or tuple(reset_mask.shape) != (B, T)):
        raise ValueError(f"reset_mask must have shape [B, T] = [{B}, {T}], got {_shape(reset_mask)}")


def document_starts(B: int, T: int, device, cu_seqlens=None, reset_mask=None) -> torch.Tensor:
    """``[B, T]`` bool: True where a token starts a document (``reset_mask`` or an inner ``cu_seqlens``
    offset); position 0 only when the mask says so (it may continue ``prev``)."""
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    if reset_mask is not None:
        starts |= reset_mask.to(device=device, dtype=torch.bool)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        starts[:, cu_seqlens[1:-1].to(device=device, dtype=torch.long)] = True
    return starts


def lag_keep_masks(B: int, T: int, W: int, device, *, cu_seqlens=None, attention_mask=None, has_prev=False,
                   reset_mask=None) -> list[torch.Tensor | None]:
    """For lags ``j = 1 .. W-1``: ``[B, T]`` bool, True where token t may read token t - j (same document,
    not padding; before position 0 only with ``prev`` and no document start up to t); None = all."""
    if cu_seqlens is None and attention_mask is None and reset_mask is None:
        return [None] * (W - 1)  # rows before position 0 are prev, or zeros without it
    starts = document_starts(B, T, device, cu_seqlens, reset_mask)
    seg = starts.long().cumsum(-1)  # document index of each token within the chunk
    pad = W - 1
    seg_p = torch.cat([seg.new_zeros(B, pad), seg], dim=1)
    real = attention_mask.to(device) != 0 if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                          device=device)
    real_p = torch.cat([torch.full((B, pad), has_prev, dtype=torch.bool, device=device), real], dim=1)
    out = []
    for j in range(1, W):
        lo = pad - j
        out.append((seg_p[:, lo: lo + T] == seg) & real_p[:, lo: lo + T])
    return out
