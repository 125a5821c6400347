"""Literal reference of the causal short convolution that generalises the KV shift (issue: the lab).

    y[b, t, h, d] = sum_{j < W} w[h, (d,) j] * x[b, t - j, h, d]

``j`` is the lag: column 0 multiplies the current token, column ``j`` the token ``j`` steps back; the
window ``W`` is ``weight.shape[-1]``; weights are per head ``[H, W]`` (the paper's KV shift for W = 2) or
per channel ``[H, D, W]`` (Primer / Canon style). A predecessor reads as zero when it lies before the
start of the token's document (a ``reset_mask`` / ``cu_seqlens`` start between them), when it is padding
(``attention_mask == 0``), or before position 0 without ``prev``; ``prev`` ``[B, W-1, H, D]`` holds the raw
rows before position 0, oldest first (zeros where the sequence had fewer). Written as loops, for tests.
"""

from __future__ import annotations

import torch

from .checks import document_starts, validate_short_conv_args

__all__ = ["short_conv_ref"]


def short_conv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition in the module docstring, one output row at a time."""
    validate_short_conv_args(x, weight, cu_seqlens, attention_mask, prev, reset_mask)
    B, T, H, D = x.shape
    W = weight.shape[-1]
    cdt = torch.promote_types(x.dtype, weight.dtype)
    xc, w = x.to(cdt), weight.to(cdt)
    w = w[:, None, :].expand(H, D, W) if w.dim() == 2 else w  # [H, D, W]
    starts = document_starts(B, T, x.device, cu_seqlens, reset_mask)
    real = attention_mask != 0 if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
    y = torch.zeros(B, T, H, D, dtype=cdt, device=x.device)
    for b in range(B):
        for t in range(T):
            for j in range(W):
                s = t - j
                if j > 0 and bool(starts[b, s + 1: t + 1].any() if s >= 0 else starts[b, : t + 1].any()):
                    continue  # a document starts after the predecessor: it belongs to another document
                if s >= 0:
                    if j > 0 and not bool(real[b, s]):
                        continue
                    src = xc[b, s]
                elif prev is not None:
                    src = prev[b, W - 1 + s].to(cdt)
                else:
                    continue
                y[b, t] += w[:, :, j] * src
    return y.to(x.dtype)
