"""Fused Triton forward and backward of the KV shift, registered as ``torch.library`` custom ops."""

import contextlib

import torch
import triton
import triton.language as tl

from .reference import previous_token_keep_mask

__all__ = ["kv_shift_triton"]

# Elements one program touches per tensor (rows x padded head dim); small enough for registers.
_MAX_TILE = 4096


@triton.jit
def _kv_shift_fwd_kernel(
    X,  # [B, T, H, D] contiguous
    W,  # [H, 2]: (current, previous)
    KEEP,  # [B, T] uint8 (bool storage), read only when HAS_KEEP
    PREV,  # [B, H, D] contiguous, read only when HAS_PREV
    Y,  # [B, T, H, D] contiguous
    N,  # B * T
    T,
    H,
    D,
    stride_wh,
    stride_wc,
    HAS_KEEP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_n * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # flattened b * T + t
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    t = rows % T
    b = rows // T
    row_stride = H * D

    w0 = tl.load(W + h * stride_wh).to(tl.float32)
    w1 = tl.load(W + h * stride_wh + stride_wc).to(tl.float32)

    offs = rows[:, None] * row_stride + h * D + cols[None, :]
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    # t == 0 never reads the row above it: that row belongs to the previous batch element.
    has_pred = row_ok & (t > 0)
    xp = tl.load(X + offs - row_stride, mask=has_pred[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        first = row_ok & (t == 0)
        p_offs = b[:, None] * row_stride + h * D + cols[None, :]
        xp += tl.load(PREV + p_offs, mask=first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + rows, mask=row_ok, other=0) != 0
        xp = tl.where(keep[:, None], xp, 0.0)
    y = w0 * x + w1 * xp
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _kv_shift_bwd_kernel(
    G,  # [B, T, H, D] contiguous grad of y
    X,  # [B, T, H, D] contiguous
    W,  # [H, 2]
    KEEP,  # [B, T] uint8, read only when HAS_KEEP
    PREV,  # [B, H, D], read only when HAS_PREV
    GX,  # [B, T, H, D] grad of x
    GPREV,  # [B, H, D] grad of prev, written only when HAS_PREV
    GW_PART,  # [num_row_blocks, H, 2] fp32 per-program partial sums of grad weight
    N,
    T,
    H,
    D,
    stride_wh,
    stride_wc,
    HAS_KEEP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_n * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    t = rows % T
    b = rows // T
    row_stride = H * D

    w0 = tl.load(W + h * stride_wh).to(tl.float32)
    w1 = tl.load(W + h * stride_wh + stride_wc).to(tl.float32)

    offs = rows[:, None] * row_stride + h * D + cols[None, :]
    m = row_ok[:, None] & col_ok[None, :]
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)

    # grad_x[t] = w0 * g[t] + w1 * g[t+1] * keep[t+1]; the last token of a row has no successor.
    has_next = row_ok & (t < T - 1)
    g_next = tl.load(G + offs + row_stride, mask=has_next[:, None] & col_ok[None, :], other=0.0).to(
        tl.float32
    )
    if HAS_KEEP:
        keep_next = tl.load(KEEP + rows + 1, mask=has_next, other=0) != 0
        g_next = tl.where(keep_next[:, None], g_next, 0.0)
    gx = w0 * g + w1 * g_next
    tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=m)

    # Rebuild the predecessor exactly as the forward did, for grad_weight[h, 1].
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    has_pred = row_ok & (t > 0)
    xp = tl.load(X + offs - row_stride, mask=has_pred[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        first = row_ok & (t == 0)
        p_offs = b[:, None] * row_stride + h * D + cols[None, :]
        xp += tl.load(PREV + p_offs, mask=first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + rows, mask=row_ok, other=0) != 0
        xp = tl.where(keep[:, None], xp, 0.0)
    else:
        keep = row_ok
    if HAS_PREV:
        # grad_prev[b] = w1 * g[b, 0] * keep[b, 0], written by the program holding t == 0.
        gp = tl.where(keep[:, None], w1 * g, 0.0)
        tl.store(GPREV + p_offs, gp.to(GPREV.dtype.element_ty), mask=first[:, None] & col_ok[None, :])

    # Per-program partial sums (summed on the host side in a fixed order: deterministic).
    s0 = tl.sum(tl.sum(g * x, axis=1), axis=0)
    s1 = tl.sum(tl.sum(g * xp, axis=1), axis=0)
    part = GW_PART + (pid_n * H + h) * 2
    tl.store(part, s0)
    tl.store(part + 1, s1)


def _blocks(N: int, D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    block_t = max(1, min(triton.next_power_of_2(max(N, 1)), _MAX_TILE // block_d))
    return block_t, block_d


def _device_ctx(x: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it x's device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _keep_u8(keep: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if keep is None:
        return x  # never read (HAS_KEEP=False); any pointer will do
    keep = keep.contiguous()
    return keep.view(torch.uint8) if keep.dtype == torch.bool else (keep != 0).view(torch.uint8)


def _kv_shift_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. ``keep`` is ``[B, T]`` (True = may read the predecessor) or None;
    position 0 reads ``prev`` (times ``keep[:, 0]``) when given, zero otherwise. ``out`` (optional,
    contiguous, like ``x``) receives the result."""
    x = x.contiguous()
    B, T, H, D = x.shape
    N = B * T
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if N == 0 or H == 0 or D == 0:
        return y
    prev_c = prev.contiguous() if prev is not None else x
    block_t, block_d = _blocks(N, D)
    grid = (triton.cdiv(N, block_t), H)
    with _device_ctx(x):
        _kv_shift_fwd_kernel[grid](
            x, weight, _keep_u8(keep, x), prev_c, y,
            N, T, H, D, weight.stride(0), weight.stride(1),
            HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    return y


def _kv_shift_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    grad_x: torch.Tensor | None = None,
    grad_prev: torch.Tensor | None = None,
    grad_weight_partial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight, grad_prev)``.

    ``grad_prev`` is ``[B, H, D]`` (zeros when ``prev`` is None). The optional buffers let tests
    pass NaN-filled outputs (``grad_weight_partial``: ``[cdiv(B*T, BLOCK_T), H, 2]`` fp32).
    """
    grad_y = grad_y.contiguous()
    x = x.contiguous()
    B, T, H, D = x.shape
    N = B * T
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if grad_x is None else grad_x
    pdt = prev.dtype if prev is not None else x.dtype
    if prev is None:
        gp = torch.zeros(B, H, D, dtype=pdt, device=x.device)
    else:
        gp = torch.empty(B, H, D, dtype=pdt, device=x.device) if grad_prev is None else grad_prev
    block_t, block_d = _blocks(N, D)
    n_blocks = triton.cdiv(N, block_t) if N > 0 else 0
    if grad_weight_partial is None:
        grad_weight_partial = torch.empty(n_blocks, H, 2, dtype=torch.float32, device=x.device)
    if N == 0 or H == 0 or D == 0:
        gw = torch.zeros(H, 2, dtype=weight.dtype, device=weight.device)
        return gx.zero_(), gw, gp.zero_()
    prev_c = prev.contiguous() if prev is not None else x
    with _device_ctx(x):
        _kv_shift_bwd_kernel[(n_blocks, H)](
            grad_y, x, weight, _keep_u8(keep, x), prev_c, gx, gp, grad_weight_partial,
            N, T, H, D, weight.stride(0), weight.stride(1),
            HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    gw = grad_weight_partial.sum(dim=0).to(weight.dtype)
    return gx, gw, gp


@torch.library.custom_op("kvshift::kv_shift_fwd", mutates_args=())
def kv_shift_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, prev: torch.Tensor | None
) -> torch.Tensor:
    """Custom op: fused KV shift forward (see :func:`_kv_shift_fwd`)."""
    return _kv_shift_fwd(x, weight, keep, prev)


@kv_shift_fwd_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, prev: torch.Tensor | None
) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kvshift::kv_shift_bwd", mutates_args=())
def kv_shift_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op: fused KV shift backward, returns ``(grad_x, grad_weight, grad_prev)``."""
    return _kv_shift_bwd(grad_y, x, weight, keep, prev)


@kv_shift_bwd_op.register_fake
def _(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, D = x.shape
    pdt = prev.dtype if prev is not None else x.dtype
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        x.new_empty((B, H, D), dtype=pdt),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, keep, prev = inputs
    ctx.has_prev = prev is not None
    ctx.save_for_backward(x, weight, keep, prev)


def _backward(ctx, grad_y: torch.Tensor):
    x, weight, keep, prev = ctx.saved_tensors
    gx, gw, gp = kv_shift_bwd_op(grad_y, x, weight, keep, prev)
    return gx, gw, None, (gp if ctx.has_prev else None)


kv_shift_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def kv_shift_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused KV shift with the exact semantics of :func:`~kvshift.ops.kv_shift.reference.kv_shift_ref`.

    Arguments are not validated here (``kv_shift`` does it). All boundary information is reduced to
    one ``[B, T]`` keep mask, or None when no token is masked; position 0 is handled in the kernel
    (it reads ``prev`` when given, zero otherwise). Accumulates in fp32; returns ``x``'s dtype.
    Differentiable in ``x``, ``weight`` and ``prev``.
    """
    B, T = x.shape[0], x.shape[1]
    # has_prev=True: the kernel itself zeroes position 0 when prev is None, so the common
    # no-mask case launches without a mask at all.
    keep = previous_token_keep_mask(
        B, T, x.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
        has_prev=True, reset_mask=reset_mask,
    )  # fmt: skip
    return kv_shift_fwd_op(x, weight, keep, prev)
