"""The public ``kv_shift`` op: the fused Triton kernel on CUDA, a lean eager-PyTorch path elsewhere.

``kv_shift_ref`` (reference.py) is the literal definition every path is tested against.
"""

from __future__ import annotations

import importlib.util

import torch

from .checks import previous_token_keep_mask, validate_kv_shift_args, validate_rope_args
from .pytorch import kv_shift_torch, kv_shift_torch_keep
from .reference import kv_shift_ref

__all__ = ["kv_shift", "kv_shift_ref", "kv_shift_rope", "kv_shift_rope_keep", "kv_shift_step",
           "kv_shift_step_unchecked"]
BACKENDS = ("auto", "torch", "reference", "triton")


# Looked up once, without importing Triton: the dispatch below is then a plain branch that
# torch.compile(fullgraph=True) traces (an import inside try/except would not be).
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.is_cuda and _HAS_TRITON)


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
    if _use_triton(x, backend):
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
    return kv_shift_torch(
        x, weight, cu_seqlens=cu_seqlens, attention_mask=attention_mask, prev=prev, reset_mask=reset_mask
    )


def kv_shift_step(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor,
                  reset_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step: ``kv_shift(x, weight, prev=prev[:, 0], reset_mask=reset_mask)`` for a single new
    token, in two or three ops and without a branch on the data (the same path in eager and compiled
    decoding).

    The hot path of token-by-token generation, so it skips the general op's padding handling (a single
    token continuing a sequence has no padding inside it) and checks only what it relies on.

    Args:
        x: ``[B, 1, H, D]`` raw key or value of the new token.
        weight: ``[H, 2]`` (current, previous).
        prev: ``[B, 1, H, D]`` raw key or value of the token before it.
        reset_mask: ``[B, 1]`` bool, True where the new token starts a document (it then reads a zero
            predecessor); None = no reset.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be [B, 1, H, D] (one new token), got shape {list(x.shape)}")
    if prev.shape != x.shape:
        raise ValueError(f"prev must have x's shape {list(x.shape)}, got {list(prev.shape)}")
    if weight.shape != (x.shape[2], 2):
        raise ValueError(f"weight must have shape [H, 2] = [{x.shape[2]}, 2], got {list(weight.shape)}")
    if reset_mask is not None and tuple(reset_mask.shape) != (x.shape[0], 1):
        raise ValueError(f"reset_mask must have shape [B, 1] = [{x.shape[0]}, 1], got {list(reset_mask.shape)}")
    w_cur, w_prev = weight.unsqueeze(-1).unbind(1)
    return kv_shift_step_unchecked(x, w_cur, w_prev, prev, reset_mask)


def kv_shift_step_unchecked(x: torch.Tensor, w_cur: torch.Tensor, w_prev: torch.Tensor, prev: torch.Tensor,
                            reset_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`kv_shift_step` without the checks, the weight given as its ``[H, 1]`` columns
    (``weight.unsqueeze(-1).unbind(1)``): the attention layer's decode path (a few microseconds per call
    count there)."""
    if reset_mask is not None:
        prev = torch.where(reset_mask[:, :, None, None], torch.zeros((), dtype=prev.dtype, device=prev.device),
                           prev)
    # [H, 1] columns broadcast over [B, 1, H, D]; the products run in the promoted dtype, like kv_shift
    y = torch.addcmul(prev * w_prev, x, w_cur)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def kv_shift_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KV shift, then rotary embedding (when ``cos``/``sin`` are given), in attention's ``[B, H, T, D]`` layout.

    Equals ``apply_rope(kv_shift(x, weight, ...), cos, sin).transpose(1, 2)``. On CUDA (or with
    ``backend="triton"``) one fused Triton kernel does all three in a single pass over ``x`` and returns
    a contiguous tensor; elsewhere the eager ops run and the result is a transposed view.

    Args:
        x: ``[B, T, H, D]`` raw keys or values; ``weight``: ``[H, 2]`` (current, previous).
        cos, sin: ``[B, T, D]`` rotate-half RoPE tables (``D`` even), or both None (values).
        attention_mask, prev, reset_mask, backend: as in :func:`kv_shift`.
    """
    validate_kv_shift_args(x, weight, None, attention_mask, prev, reset_mask)
    validate_rope_args(x, cos, sin)
    if backend == "reference":
        from ..rope import apply_rope

        y = kv_shift_ref(x, weight, attention_mask=attention_mask, prev=prev, reset_mask=reset_mask)
        return (y if cos is None else apply_rope(y, cos, sin)).transpose(1, 2)
    keep = previous_token_keep_mask(x.shape[0], x.shape[1], x.device, attention_mask=attention_mask,
                                    has_prev=True, reset_mask=reset_mask)
    return kv_shift_rope_keep(x, weight, cos, sin, keep=keep, prev=prev, backend=backend)


def kv_shift_rope_keep(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None, *, keep: torch.Tensor | None, prev: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """:func:`kv_shift_rope` for validated arguments whose boundaries are already one ``[B, T]`` keep mask
    (``previous_token_keep_mask(..., has_prev=True)``, None = keep all): the attention layer builds it once
    per forward for every layer's K and V (it was about 50 us of host time per call)."""
    if _use_triton(x, backend):
        from .triton import kv_shift_rope_triton_unchecked

        return kv_shift_rope_triton_unchecked(x, weight, cos, sin, keep=keep, prev=prev)
    from ..rope import apply_rope

    y = kv_shift_torch_keep(x, weight, prev, keep)
    return (y if cos is None else apply_rope(y, cos, sin)).transpose(1, 2)
