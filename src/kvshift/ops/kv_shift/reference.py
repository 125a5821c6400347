"""Plain-PyTorch reference of the KV shift: the one place that defines the mechanism.

    y[b, t, h] = weight[h, 0] * x[b, t, h] + weight[h, 1] * x[b, t-1, h]

with x[b, -1] = ``prev[b]`` when continuing a sequence (decode, chunked prefill) and zero otherwise,
and a zero predecessor at every document start and after every padded position. Every fast path in
kvshift is tested against :func:`kv_shift_ref`.
"""

from __future__ import annotations

import torch

from .checks import previous_token_keep_mask, validate_kv_shift_args

__all__ = ["kv_shift_ref"]


def kv_shift_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference KV shift; see the module docstring. Returns a tensor shaped and typed like ``x``.

    Args:
        x: ``[B, T, H, D]`` raw keys or values (after the projection, before RoPE).
        weight: ``[H, 2]``; column 0 multiplies the current token, column 1 the previous one.
        cu_seqlens: ``[N+1]`` int offsets of the documents packed in a ``B == 1`` row.
        attention_mask: ``[B, T]``, 1 = real token, 0 = padding (a padded predecessor reads as zero).
        prev: ``[B, H, D]`` raw previous token used as the predecessor of position 0.
        reset_mask: ``[B, T]`` bool, True where a token starts a new document.
    """
    validate_kv_shift_args(x, weight, cu_seqlens, attention_mask, prev, reset_mask)
    B, T, H, D = x.shape
    cdt = torch.promote_types(x.dtype, weight.dtype)
    xc = x.to(cdt)
    w = weight.to(cdt)
    first = prev.to(cdt).unsqueeze(1) if prev is not None else xc.new_zeros(B, 1, H, D)
    x_prev = torch.cat([first, xc[:, :-1]], dim=1)  # [B, T, H, D]; never torch.roll
    keep = previous_token_keep_mask(
        B, T, x.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
        has_prev=prev is not None, reset_mask=reset_mask,
    )
    if keep is not None:
        # where, not a multiply: a NaN/inf in a padded row must not leak into its successor
        x_prev = torch.where(keep[:, :, None, None], x_prev, torch.zeros((), dtype=cdt, device=x.device))
    y = xc * w[:, 0].view(1, 1, H, 1) + x_prev * w[:, 1].view(1, 1, H, 1)
    return y.to(x.dtype)
