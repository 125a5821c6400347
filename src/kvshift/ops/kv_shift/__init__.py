"""The public ``kv_shift`` op: the fused Triton kernel on CUDA, a lean eager-PyTorch path elsewhere.

``kv_shift_ref`` (reference.py) is the literal definition every path is tested against.
"""

from __future__ import annotations

import torch

from .fused_torch import kv_shift_fused_torch
from .reference import kv_shift_ref, validate_kv_shift_args

__all__ = ["kv_shift", "kv_shift_ref"]


def _triton_available(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        from . import triton as _kernels  # noqa: F401
    except Exception:  # Triton missing or unusable on this machine: the reference is always correct
        return False
    return True


def kv_shift(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mix every token with its predecessor, per head: ``y_t = weight[h,0]*x_t + weight[h,1]*x_{t-1}``.

    Args:
        x: ``[B, T, H, D]`` raw keys or values (after the K/V projection, before RoPE).
        weight: ``[H, 2]``: column 0 multiplies the current token, column 1 the previous one.
        cu_seqlens: ``[N+1]`` int32 offsets of documents packed in one row (``B == 1``); the
            predecessor is zero at every document start.
        attention_mask: ``[B, T]``, 1 = real token, 0 = padding; a padded predecessor reads as zero.
        prev: ``[B, H, D]`` raw (unshifted) previous token, the predecessor of position 0
            (decode, chunked prefill); zero when None.
        reset_mask: ``[B, T]`` bool, True where a new document starts (e.g. ``position_ids == 0``).
        backend: ``"auto"`` (Triton on CUDA, ``"torch"`` elsewhere), ``"torch"`` (custom-autograd
            eager PyTorch), ``"reference"`` (the literal definition) or ``"triton"``.

    Returns:
        ``[B, T, H, D]`` tensor of ``x``'s dtype. Differentiable in ``x``, ``weight`` and ``prev``.
    """
    if backend not in ("auto", "torch", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch', 'reference' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and _triton_available(x))
    if use_triton:
        from .triton import kv_shift_triton

        validate_kv_shift_args(x, weight, cu_seqlens, attention_mask, prev, reset_mask)
        return kv_shift_triton(
            x, weight, cu_seqlens=cu_seqlens, attention_mask=attention_mask, prev=prev, reset_mask=reset_mask
        )
    if backend == "reference":
        return kv_shift_ref(
            x, weight, cu_seqlens=cu_seqlens, attention_mask=attention_mask, prev=prev, reset_mask=reset_mask
        )
    validate_kv_shift_args(x, weight, cu_seqlens, attention_mask, prev, reset_mask)
    return kv_shift_fused_torch(
        x, weight, cu_seqlens=cu_seqlens, attention_mask=attention_mask, prev=prev, reset_mask=reset_mask
    )
