"""Fused Triton KV shift, optionally followed by RoPE, forward and backward.

One pass over memory: the shift, the rotary embedding (``HAS_ROPE``) and, with ``SDPA_LAYOUT``, the
change from ``[B, T, H, D]`` to attention's ``[B, H, T, D]`` (instead of three passes: shift, RoPE,
transpose). Registered as ``torch.library`` custom ops so that ``torch.compile(fullgraph=True)``
traces them.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .checks import previous_token_keep_mask, validate_kv_shift_args, validate_rope_args

__all__ = ["kv_shift_triton", "kv_shift_rope_triton", "kv_shift_rope_triton_unchecked"]

# Elements one program touches per tensor (rows x padded head dim); small enough for registers.
# Half of it with RoPE: a program then keeps several more tiles live (rotate-half partners, cos, sin).
_MAX_TILE = 4096
_MAX_TILE_ROPE = 2048


@triton.jit
def _load_x_and_pred(
    X, KEEP, PREV, rows, cols, row_ok, col_ok, t, b, h, H, D,
    HAS_KEEP: tl.constexpr, HAS_PREV: tl.constexpr,
):  # fmt: skip
    """fp32 tiles ``(x, x_prev)`` of head ``h`` at ``rows x cols``; ``x_prev`` is the predecessor
    exactly as the shift reads it (``prev`` at t == 0, zero there without it, zero where not kept)."""
    row_stride = H * D
    offs = rows[:, None] * row_stride + h * D + cols[None, :]
    x = tl.load(X + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # t == 0 never reads the row above it: that row belongs to the previous batch element.
    has_pred = row_ok & (t > 0)
    xp = tl.load(X + offs - row_stride, mask=has_pred[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        first = row_ok & (t == 0)
        p_offs = b[:, None].to(tl.int64) * row_stride + h * D + cols[None, :]
        xp += tl.load(PREV + p_offs, mask=first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + rows, mask=row_ok, other=0) != 0
        xp = tl.where(keep[:, None], xp, 0.0)  # where, not a multiply: a NaN must not leak
    return x, xp


@triton.jit
def _out_row(rows, t, b, h, T, H, D, SDPA_LAYOUT: tl.constexpr):
    """Offset of token ``rows``' head-``h`` vector in the output (and its gradient), and the
    distance from token t to token t + 1 there."""
    if SDPA_LAYOUT:
        row = ((b.to(tl.int64) * H + h) * T + t) * D  # [B, H, T, D]: the tokens of one head are consecutive
        step = D
    else:
        row = rows * (H * D) + h * D  # [B, T, H, D]: x's own layout
        step = H * D
    return row, step


@triton.jit
def _load_grad_shifted(
    G, COS, SIN, g_row, cos_row, sin_row, cols, pcols, lo, m, stride_cd, stride_sd,
    HAS_ROPE: tl.constexpr,
):  # fmt: skip
    """fp32 gradient w.r.t. the shifted (pre-RoPE) tile, from the output gradient at ``g_row``.

    With ``y = s * cos + rotate_half(s) * sin``: ``ds = g * cos + rotate_half^T(g * sin)``, where
    ``rotate_half^T(u) = cat(u2, -u1)`` reads the partner columns ``pcols``.
    """
    g = tl.load(G + g_row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_ROPE:
        cos = tl.load(COS + cos_row[:, None] + cols[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
        g_p = tl.load(G + g_row[:, None] + pcols[None, :], mask=m, other=0.0).to(tl.float32)
        sin_p = tl.load(SIN + sin_row[:, None] + pcols[None, :] * stride_sd, mask=m, other=0.0).to(tl.float32)
        u = g_p * sin_p
        g = g * cos + tl.where(lo[None, :], u, -u)
    return g


@triton.jit
def _kv_shift_fwd_kernel(
    X,  # [B, T, H, D] contiguous
    W,  # [H, 2]: (current, previous)
    COS,  # [B, T, D] (any strides), read only when HAS_ROPE
    SIN,  # [B, T, D] (any strides), read only when HAS_ROPE
    KEEP,  # [B, T] uint8 (bool storage), read only when HAS_KEEP
    PREV,  # [B, H, D] contiguous, read only when HAS_PREV
    Y,  # [B, H, T, D] contiguous when SDPA_LAYOUT, else [B, T, H, D] contiguous
    T,
    H,
    D: tl.constexpr,  # a compile-time head dim: its divisibility (e.g. 72 = 8 x 9) allows vector loads
    stride_wh,
    stride_wc,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    HAS_ROPE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    SDPA_LAYOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b_id = tl.program_id(2)
    # (t, b) straight from the grid: 32-bit index math with no division; offsets widen to 64 bits.
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    b = t * 0 + b_id
    rows = b_id.to(tl.int64) * T + t  # flattened b * T + t
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < T
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]

    w0 = tl.load(W + h * stride_wh).to(tl.float32)
    w1 = tl.load(W + h * stride_wh + stride_wc).to(tl.float32)

    x, xp = _load_x_and_pred(X, KEEP, PREV, rows, cols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV)
    y = w0 * x + w1 * xp
    if HAS_ROPE:
        # rotate_half(s) = cat(-s2, s1): column c reads the shifted value at its partner column.
        half = D // 2
        lo = cols < half
        pcols = tl.where(lo, cols + half, cols - half)
        x_p, xp_p = _load_x_and_pred(
            X, KEEP, PREV, rows, pcols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV
        )
        s_p = w0 * x_p + w1 * xp_p
        cos = tl.load(
            COS + (b.to(tl.int64) * stride_cb + t * stride_ct)[:, None] + cols[None, :] * stride_cd, mask=m,
            other=0.0
        ).to(tl.float32)
        sin = tl.load(
            SIN + (b.to(tl.int64) * stride_sb + t * stride_st)[:, None] + cols[None, :] * stride_sd, mask=m,
            other=0.0
        ).to(tl.float32)
        y = y * cos + tl.where(lo[None, :], -s_p, s_p) * sin
    y_row, _ = _out_row(rows, t, b, h, T, H, D, SDPA_LAYOUT)
    tl.store(Y + y_row[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _kv_shift_bwd_kernel(
    G,  # grad of y, laid out like Y (contiguous)
    X,  # [B, T, H, D] contiguous
    W,  # [H, 2]
    COS,  # [B, T, D], read only when HAS_ROPE
    SIN,  # [B, T, D], read only when HAS_ROPE
    KEEP,  # [B, T] uint8, read only when HAS_KEEP
    PREV,  # [B, H, D], read only when HAS_PREV
    GX,  # [B, T, H, D] grad of x
    GPREV,  # [B, H, D] grad of prev, written only when HAS_PREV
    GW_PART,  # [num_row_blocks, H, 2] fp32 per-program partial sums of grad weight
    T,
    H,
    D: tl.constexpr,  # a compile-time head dim: its divisibility (e.g. 72 = 8 x 9) allows vector loads
    stride_wh,
    stride_wc,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    HAS_ROPE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_PREV: tl.constexpr,
    SDPA_LAYOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b_id = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # 32-bit (t, b) from the grid, as in the forward
    b = t * 0 + b_id
    rows = b_id.to(tl.int64) * T + t
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < T
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    half = D // 2
    lo = cols < half
    pcols = tl.where(lo, cols + half, cols - half)  # rotate-half partners, read only when HAS_ROPE

    w0 = tl.load(W + h * stride_wh).to(tl.float32)
    w1 = tl.load(W + h * stride_wh + stride_wc).to(tl.float32)

    # Gradient w.r.t. the shifted tile at t and at t + 1 (RoPE undone first).
    g_row, g_step = _out_row(rows, t, b, h, T, H, D, SDPA_LAYOUT)
    cos_row = b.to(tl.int64) * stride_cb + t * stride_ct
    sin_row = b.to(tl.int64) * stride_sb + t * stride_st
    ds = _load_grad_shifted(
        G, COS, SIN, g_row, cos_row, sin_row, cols, pcols, lo, m, stride_cd, stride_sd, HAS_ROPE
    )
    has_next = row_ok & (t < T - 1)  # the last token of a row has no successor
    ds_next = _load_grad_shifted(
        G, COS, SIN, g_row + g_step, cos_row + stride_ct, sin_row + stride_st, cols, pcols, lo,
        has_next[:, None] & col_ok[None, :], stride_cd, stride_sd, HAS_ROPE,
    )  # fmt: skip
    if HAS_KEEP:
        keep_next = tl.load(KEEP + rows + 1, mask=has_next, other=0) != 0
        ds_next = tl.where(keep_next[:, None], ds_next, 0.0)
    # grad_x[t] = w0 * ds[t] + w1 * ds[t+1] * keep[t+1]
    gx = w0 * ds + w1 * ds_next
    x_offs = rows[:, None] * (H * D) + h * D + cols[None, :]
    tl.store(GX + x_offs, gx.to(GX.dtype.element_ty), mask=m)

    # Rebuild the predecessor exactly as the forward did, for grad_weight[h, 1].
    x, xp = _load_x_and_pred(X, KEEP, PREV, rows, cols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV)
    if HAS_PREV:
        # grad_prev[b] = w1 * ds[b, 0] * keep[b, 0], written by the program holding t == 0.
        if HAS_KEEP:
            keep = tl.load(KEEP + rows, mask=row_ok, other=0) != 0
        else:
            keep = row_ok
        first = row_ok & (t == 0)
        p_offs = b[:, None].to(tl.int64) * (H * D) + h * D + cols[None, :]
        gp = tl.where(keep[:, None], w1 * ds, 0.0)
        tl.store(GPREV + p_offs, gp.to(GPREV.dtype.element_ty), mask=first[:, None] & col_ok[None, :])

    # Per-program partial sums (summed on the host side in a fixed order: deterministic).
    part = GW_PART + ((b_id * tl.num_programs(0) + pid_t) * H + h) * 2
    tl.store(part, tl.sum(tl.sum(ds * x, axis=1), axis=0))
    tl.store(part + 1, tl.sum(tl.sum(ds * xp, axis=1), axis=0))


def _blocks(T: int, D: int, rope: bool) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)``: tokens of one sequence per program and the padded head dim."""
    block_d = triton.next_power_of_2(max(D, 1))
    max_tile = _MAX_TILE_ROPE if rope else _MAX_TILE
    block_t = max(1, min(triton.next_power_of_2(max(T, 1)), max_tile // block_d))
    return block_t, block_d


def _num_warps(x: torch.Tensor | torch.dtype, block_t: int, block_d: int) -> int:
    """8 warps for full fp32 tiles (with 4 warps they need 146-168 registers per thread, measured by
    ``kvshift bench kernels``), else 4."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return 8 if dtype.itemsize >= 4 and block_t * block_d >= _MAX_TILE_ROPE else 4


def _grid(B: int, T: int, H: int, block_t: int) -> tuple[int, int, int]:
    """Programs: token blocks of one sequence x heads x batch (B <= 65535, the grid's z limit)."""
    if B > 65535:
        raise ValueError(f"the Triton KV shift handles a batch of at most 65535 sequences, got B = {B}")
    return triton.cdiv(T, block_t), H, B


def _device_ctx(x: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it x's device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _keep_u8(keep: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if keep is None:
        return x  # never read (HAS_KEEP=False); any pointer will do
    keep = keep.contiguous()
    return keep.view(torch.uint8) if keep.dtype == torch.bool else (keep != 0).view(torch.uint8)


def _rope_args(
    cos: torch.Tensor | None, sin: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Kernel arguments for cos/sin: the tensors (``x`` as an unread stand-in) and their strides."""
    if cos is None or sin is None:
        return x, x, (0,) * 6
    return cos, sin, (*cos.stride(), *sin.stride())


def _out_shape(x: torch.Tensor, sdpa_layout: bool) -> tuple[int, int, int, int]:
    B, T, H, D = x.shape
    return (B, H, T, D) if sdpa_layout else (B, T, H, D)


def _kv_shift_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns ``[B, H, T, D]`` (``sdpa_layout``) or ``[B, T, H, D]``,
    contiguous (``out`` when given).

    ``keep`` is ``[B, T]`` (True = may read the predecessor) or None; position 0 reads ``prev``
    (times ``keep[:, 0]``) when given, zero otherwise. RoPE is applied when ``cos``/``sin`` are given.
    """
    x = x.contiguous()
    B, T, H, D = x.shape
    N = B * T
    y = x.new_empty(_out_shape(x, sdpa_layout)) if out is None else out
    if N == 0 or H == 0 or D == 0:
        return y
    cos_t, sin_t, cs_strides = _rope_args(cos, sin, x)
    prev_c = prev.contiguous() if prev is not None else x
    block_t, block_d = _blocks(T, D, cos is not None)
    with _device_ctx(x):
        _kv_shift_fwd_kernel[_grid(B, T, H, block_t)](
            x, weight, cos_t, sin_t, _keep_u8(keep, x), prev_c, y,
            T, H, D, weight.stride(0), weight.stride(1), *cs_strides,
            HAS_ROPE=cos is not None, HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
            SDPA_LAYOUT=sdpa_layout, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_num_warps(x, block_t, block_d),
        )  # fmt: skip
    return y


def _kv_shift_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
    grad_x: torch.Tensor | None = None,
    grad_prev: torch.Tensor | None = None,
    grad_weight_partial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight, grad_prev)``.

    ``grad_y`` is laid out like the forward's output; ``grad_prev`` is ``[B, H, D]`` (an empty tensor
    when ``prev`` is None). The optional buffers let tests pass NaN-filled outputs
    (``grad_weight_partial``: ``[B * cdiv(T, BLOCK_T), H, 2]`` fp32).
    """
    grad_y = grad_y.contiguous()
    x = x.contiguous()
    B, T, H, D = x.shape
    N = B * T
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if grad_x is None else grad_x
    if prev is None:  # no grad_prev to compute: an empty stand-in, no allocation or launch
        gp = x.new_empty(0)
    else:
        gp = torch.empty(B, H, D, dtype=prev.dtype, device=x.device) if grad_prev is None else grad_prev
    if N == 0 or H == 0 or D == 0:
        gw = torch.zeros(H, 2, dtype=weight.dtype, device=weight.device)
        return gx.zero_(), gw, gp.zero_()
    block_t, block_d = _blocks(T, D, cos is not None)
    grid = _grid(B, T, H, block_t)
    n_blocks = grid[0] * B
    if grad_weight_partial is None:
        grad_weight_partial = torch.empty(n_blocks, H, 2, dtype=torch.float32, device=x.device)
    cos_t, sin_t, cs_strides = _rope_args(cos, sin, x)
    prev_c = prev.contiguous() if prev is not None else x
    with _device_ctx(x):
        _kv_shift_bwd_kernel[grid](
            grad_y, x, weight, cos_t, sin_t, _keep_u8(keep, x), prev_c, gx, gp, grad_weight_partial,
            T, H, D, weight.stride(0), weight.stride(1), *cs_strides,
            HAS_ROPE=cos is not None, HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
            SDPA_LAYOUT=sdpa_layout, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_num_warps(x, block_t, block_d),
        )  # fmt: skip
    gw = grad_weight_partial.sum(dim=0).to(weight.dtype)
    return gx, gw, gp


@torch.library.custom_op("kvshift::kv_shift_fwd", mutates_args=())
def kv_shift_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
) -> torch.Tensor:
    """Custom op: fused KV shift (+ RoPE, + layout change) forward (see :func:`_kv_shift_fwd`)."""
    return _kv_shift_fwd(x, weight, cos, sin, keep, prev, sdpa_layout)


@kv_shift_fwd_op.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
) -> torch.Tensor:
    return x.new_empty(_out_shape(x, sdpa_layout))


@torch.library.custom_op("kvshift::kv_shift_bwd", mutates_args=())
def kv_shift_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op: fused backward, returns ``(grad_x, grad_weight, grad_prev)``."""
    return _kv_shift_bwd(grad_y, x, weight, cos, sin, keep, prev, sdpa_layout)


@kv_shift_bwd_op.register_fake
def _(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keep: torch.Tensor | None,
    prev: torch.Tensor | None,
    sdpa_layout: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, D = x.shape
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        x.new_empty((B, H, D), dtype=prev.dtype) if prev is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, keep, prev, sdpa_layout = inputs
    ctx.has_prev = prev is not None
    ctx.sdpa_layout = sdpa_layout
    ctx.save_for_backward(x, weight, cos, sin, keep, prev)


def _backward(ctx, grad_y: torch.Tensor):
    x, weight, cos, sin, keep, prev = ctx.saved_tensors
    gx, gw, gp = kv_shift_bwd_op(grad_y, x, weight, cos, sin, keep, prev, ctx.sdpa_layout)
    return gx, gw, None, None, None, (gp if ctx.has_prev else None), None


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
    (it reads ``prev`` when given, zero otherwise). Accumulates in fp32; returns a contiguous
    ``[B, T, H, D]`` tensor of ``x``'s dtype. Differentiable in ``x``, ``weight`` and ``prev``.
    """
    B, T = x.shape[0], x.shape[1]
    # has_prev=True: the kernel itself zeroes position 0 when prev is None, so the common
    # no-mask case launches without a mask at all.
    keep = previous_token_keep_mask(
        B, T, x.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
        has_prev=True, reset_mask=reset_mask,
    )  # fmt: skip
    return kv_shift_fwd_op(x, weight, None, None, keep, prev, False)


def _validate(x, weight, cos, sin, keep, prev) -> None:
    """Raise ``ValueError`` naming the argument when an input of :func:`kv_shift_rope_triton` is malformed."""
    validate_kv_shift_args(x, weight, prev=prev)
    B, T = x.shape[:2]
    if keep is not None and (not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (B, T)):
        got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must have shape [B, T] = [{B}, {T}], got {got}")
    validate_rope_args(x, cos, sin)


def kv_shift_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """KV shift, then RoPE, then transpose to the SDPA layout, in one fused pass.

    Equals ``apply_rope(kv_shift_ref(x, weight, prev=prev, reset_mask=~keep), cos, sin).transpose(1, 2)``
    (without ``apply_rope`` when ``cos`` and ``sin`` are None, e.g. for values), materialised as a
    contiguous ``[B, H, T, D]`` tensor of ``x``'s dtype; all math in fp32.

    Args:
        x: ``[B, T, H, D]`` raw keys or values (any strides).
        weight: ``[H, 2]``; column 0 multiplies the current token, column 1 the previous one.
        cos, sin: ``[B, T, D]`` rotate-half RoPE tables (any strides, e.g. expanded over B), or
            both None for no RoPE. RoPE needs an even ``D``. Not differentiated (treated as constants).
        keep: ``[B, T]`` bool, False where the predecessor reads as zero (document starts, after
            padding); see ``previous_token_keep_mask(..., has_prev=True)``. None = keep all.
        prev: ``[B, H, D]`` raw predecessor of position 0 (decode state); zero when None.

    Differentiable in ``x``, ``weight`` and ``prev``.
    """
    _validate(x, weight, cos, sin, keep, prev)
    return kv_shift_fwd_op(x, weight, cos, sin, keep, prev, True)


def kv_shift_rope_triton_unchecked(x, weight, cos=None, sin=None, *, keep=None, prev=None) -> torch.Tensor:
    """:func:`kv_shift_rope_triton` for callers that validated the arguments already (``kv_shift_rope``):
    one validation per public call."""
    return kv_shift_fwd_op(x, weight, cos, sin, keep, prev, True)
