"""Argument checks of the KV-shift op (run once per public call) and the boundary rule shared by every
backend: which tokens may read their predecessor (``previous_token_keep_mask``)."""

from __future__ import annotations

import torch

__all__ = ["validate_kv_shift_args", "validate_cu_seqlens", "validate_rope_args", "previous_token_keep_mask"]


def _shape(t) -> str:
    """``[B, T, ...]`` of a tensor, else the type name (for error messages)."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


def validate_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is ``[0, ..., T]``, strictly increasing, for ``B == 1``
    (the values are read only for a CPU tensor outside ``torch.compile``: anything else would sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of document offsets [N+1]")
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens describes one packed row: x must have B == 1, got B = {B}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets [0, ..., T], got {cu_seqlens.numel()}")
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        # Reading the values of a device tensor is a host sync (and a graph break under torch.compile),
        # so the values are checked only for CPU tensors (as flash-attention's varlen API, which checks none)
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = x.shape[1] = {T}, got {cu[-1]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu}")


def validate_kv_shift_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the argument when an input of :func:`kv_shift` is malformed."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [B, T, H, D], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, T, H, D], got {x.dim()}-D tensor of shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    B, T, H, D = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or tuple(weight.shape) != (H, 2):
        got = _shape(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [H, 2] = [{H}, 2] (H = x.shape[2]), got {got}")
    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, B, T)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            got = _shape(attention_mask) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have shape [B, T] = [{B}, {T}], got {got}")
    if prev is not None:
        if not isinstance(prev, torch.Tensor) or tuple(prev.shape) != (B, H, D):
            got = _shape(prev) if isinstance(prev, torch.Tensor) else type(prev).__name__
            raise ValueError(f"prev must have shape [B, H, D] = [{B}, {H}, {D}], got {got}")
    if reset_mask is not None:
        if not isinstance(reset_mask, torch.Tensor) or tuple(reset_mask.shape) != (B, T):
            got = _shape(reset_mask) if isinstance(reset_mask, torch.Tensor) else type(reset_mask).__name__
            raise ValueError(f"reset_mask must have shape [B, T] = [{B}, {T}], got {got}")


def validate_rope_args(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``cos`` and ``sin`` are both None or both ``[B, T, D]`` with ``D`` even."""
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (both None = no RoPE)")
    if cos is None:
        return
    B, T, _, D = x.shape
    if D % 2:
        raise ValueError(f"x must have an even head dim D for RoPE, got D = {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T, D):
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape [B, T, D] = [{B}, {T}, {D}], got {got}")


def previous_token_keep_mask(
    B: int,
    T: int,
    device: torch.device,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    has_prev: bool = False,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[B, T]`` bool: True where token t may read its predecessor, or None when every token may.

    Position 0 reads ``prev`` when it is given; interior ``cu_seqlens`` offsets and ``reset_mask``
    mark document starts; a padded predecessor (``attention_mask == 0`` at t-1) is never read.
    """
    keep = None

    def _and(a, b):
        return b if a is None else a & b

    if not has_prev:
        k0 = torch.ones(B, T, dtype=torch.bool, device=device)
        k0[:, 0] = False
        keep = k0
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        starts = cu_seqlens[1:-1].to(device=device, dtype=torch.long)
        k = torch.ones(B, T, dtype=torch.bool, device=device)
        k[:, starts] = False
        keep = _and(keep, k)
    if attention_mask is not None:
        real = attention_mask.to(device) != 0
        k = torch.ones(B, T, dtype=torch.bool, device=device)
        k[:, 1:] = real[:, :-1]
        keep = _and(keep, k)
    if reset_mask is not None:
        keep = _and(keep, ~reset_mask.to(device=device, dtype=torch.bool))
    return keep
