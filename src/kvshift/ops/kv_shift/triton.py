"""Fused Triton KV shift, optionally followed by RoPE, forward and backward.

One pass over memory: the shift, the rotary embedding (``HAS_ROPE``) and, with ``SDPA_LAYOUT``, the
change from ``[B, T, H, D]`` to attention's ``[B, H, T, D]`` (instead of three passes: shift, RoPE,
transpose). Registered as ``torch.library`` custom ops so that ``torch.compile(fullgraph=True)``
traces them. ``x`` is read in place through its strides (e.g. a slice of a fused QKV projection), in
forward and backward. On CUDA, large launches autotune ``BLOCK_T`` x ``num_warps`` (see ``_AUTOTUNE_KEY``).
"""

import contextlib
import os

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
    X, KEEP, PREV, x_row, x_step, rows, cols, row_ok, col_ok, t, b, h, H, D,
    HAS_KEEP: tl.constexpr, HAS_PREV: tl.constexpr,
):  # fmt: skip
    """fp32 tiles ``(x, x_prev)`` of head ``h`` at ``rows x cols``; ``x_prev`` is the predecessor
    exactly as the shift reads it (``prev`` at t == 0, zero there without it, zero where not kept).

    ``x_row``: offset of each token's head-``h`` vector in ``X`` (any batch, token and head strides);
    ``x_step``: the distance from token t to token t - 1."""
    offs = x_row[:, None] + cols[None, :]
    x = tl.load(X + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # t == 0 never reads the row above it: that row belongs to the previous batch element.
    has_pred = row_ok & (t > 0)
    xp = tl.load(X + offs - x_step, mask=has_pred[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        first = row_ok & (t == 0)
        p_offs = b[:, None].to(tl.int64) * (H * D) + h * D + cols[None, :]
        xp += tl.load(PREV + p_offs, mask=first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + rows, mask=row_ok, other=0) != 0
        xp = tl.where(keep[:, None], xp, 0.0)  # where, not a multiply: a NaN must not leak
    return x, xp


@triton.jit
def _x_row(t, b_id, h, stride_xb, stride_xt, stride_xh, D: tl.constexpr):
    """``(x_row, x_step)`` of :func:`_load_x_and_pred` from x's strides in units of ``D``: a multiple of
    the compile-time ``D`` (vector loads, as for a contiguous x), in 64 bits."""
    base = b_id.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    return (base + t.to(tl.int64) * stride_xt) * D, stride_xt * D


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
    X,  # [B, T, H, D], strides stride_x* (x D), last dim contiguous
    W,  # [H, 2]: (current, previous)
    COS,  # [B, T, D] (any strides), read only when HAS_ROPE
    SIN,  # [B, T, D] (any strides), read only when HAS_ROPE
    KEEP,  # [B, T] uint8 (bool storage), read only when HAS_KEEP
    PREV,  # [B, H, D] contiguous, read only when HAS_PREV
    Y,  # [B, H, T, D] contiguous when SDPA_LAYOUT, else [B, T, H, D] contiguous
    T,
    H,
    D: tl.constexpr,  # a compile-time head dim: its divisibility (e.g. 72 = 8 x 9) allows vector loads
    stride_xb,  # x's batch, token and head strides, in units of D (its last dim has stride 1)
    stride_xt,
    stride_xh,
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

    x_row, x_step = _x_row(t, b_id, h, stride_xb, stride_xt, stride_xh, D)
    x, xp = _load_x_and_pred(
        X, KEEP, PREV, x_row, x_step, rows, cols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV
    )
    y = w0 * x + w1 * xp
    if HAS_ROPE:
        # rotate_half(s) = cat(-s2, s1): column c reads the shifted value at its partner column.
        half = D // 2
        lo = cols < half
        pcols = tl.where(lo, cols + half, cols - half)
        x_p, xp_p = _load_x_and_pred(
            X, KEEP, PREV, x_row, x_step, rows, pcols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV
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
    X,  # [B, T, H, D], strides stride_x* (x D), last dim contiguous
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
    stride_xb,  # x's batch, token and head strides, in units of D (its last dim has stride 1)
    stride_xt,
    stride_xh,
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
    x_row, x_step = _x_row(t, b_id, h, stride_xb, stride_xt, stride_xh, D)
    x, xp = _load_x_and_pred(
        X, KEEP, PREV, x_row, x_step, rows, cols, row_ok, col_ok, t, b, h, H, D, HAS_KEEP, HAS_PREV
    )
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
    """``(BLOCK_T, BLOCK_D)`` of the fixed config: tokens of one sequence per program and the padded head dim."""
    block_d = triton.next_power_of_2(max(D, 1))
    max_tile = _MAX_TILE_ROPE if rope else _MAX_TILE
    block_t = max(1, min(triton.next_power_of_2(max(T, 1)), max_tile // block_d))
    return block_t, block_d


def _num_warps(x: torch.Tensor | torch.dtype, block_t: int, block_d: int) -> int:
    """Warps of the fixed config: 8 for full fp32 tiles (with 4 warps they need 146-168 registers per
    thread, measured by ``kvshift bench kernels``), else 4."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return 8 if dtype.itemsize >= 4 and block_t * block_d >= _MAX_TILE_ROPE else 4


# Autotuning (CUDA, compiled kernels, launches of at least _AUTOTUNE_MIN_ROWS (token, head) rows):
# BLOCK_T x num_warps, keyed on the head dim, RoPE and (added by Triton's autotuner itself) the dtype of
# every tensor argument. The interpreter, ahead-of-time compiles (``kvshift bench kernels``) and small
# launches (tests, decode steps: tuning them measures launch latency and costs a compile per config) take
# the fixed config of _blocks / _num_warps. KVSHIFT_TRITON_AUTOTUNE=0 turns autotuning off.
_AUTOTUNE_BLOCK_T = (16, 32, 64)
_AUTOTUNE_WARPS = (2, 4, 8)
_AUTOTUNE_KEY = ["D", "HAS_ROPE"]
_AUTOTUNE_MIN_ROWS = 1 << 16


def _autotune_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt in _AUTOTUNE_BLOCK_T for w in _AUTOTUNE_WARPS]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Configs whose tile holds at most as many elements per thread as the fixed config's largest 4-warp
    tile (``_MAX_TILE`` / 128, half with RoPE), so no candidate is sure to spill; at least the one with
    the fewest per thread."""
    args = {**named_args, **kwargs}
    max_tile = _MAX_TILE_ROPE if args["HAS_ROPE"] else _MAX_TILE
    per_thread = {c: c.kwargs["BLOCK_T"] * args["BLOCK_D"] / (32 * c.num_warps) for c in configs}
    kept = [c for c in configs if per_thread[c] <= max_tile / 128]
    return kept or [min(configs, key=lambda c: (per_thread[c], c.kwargs["BLOCK_T"]))]


def _autotuner(kernel: str):
    """The autotuned forward (``"fwd"``) or backward (``"bwd"``) kernel, built on first use (after any
    re-wrapping of the module's kernels). The backward's weight-gradient partials are the only output
    that depends on the config (one slot per program, the number of programs depends on BLOCK_T): its
    buffer starts at zero and is restored after every benchmark run, so the unused slots stay zero."""
    tuned = _AUTOTUNERS.get(kernel)
    if tuned is None:
        fn = _kv_shift_fwd_kernel if kernel == "fwd" else _kv_shift_bwd_kernel
        tuned = triton.autotune(
            configs=_autotune_configs(), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs},
            restore_value=["GW_PART"] if kernel == "bwd" else None,
        )(fn)  # fmt: skip
        _AUTOTUNERS[kernel] = tuned
    return tuned


_AUTOTUNERS: dict = {}


def _autotune(x: torch.Tensor) -> bool:
    """Whether a launch on ``x`` is autotuned (see ``_AUTOTUNE_KEY``)."""
    from triton.runtime.jit import JITFunction

    B, T, H, _ = x.shape
    return (
        x.is_cuda and B * T * H >= _AUTOTUNE_MIN_ROWS and isinstance(_kv_shift_fwd_kernel, JITFunction)
        and isinstance(_kv_shift_bwd_kernel, JITFunction) and os.environ.get("KVSHIFT_TRITON_AUTOTUNE", "1") != "0"
        and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    )  # fmt: skip


def _config(x: torch.Tensor, rope: bool, config: tuple[int, int] | None) -> tuple[int, int] | None:
    """The launch config ``(BLOCK_T, num_warps)``: ``config`` when given, None (autotuned) when
    :func:`_autotune` says so, else the fixed config of :func:`_blocks` and :func:`_num_warps`."""
    if config is not None or _autotune(x):
        return config
    _, T, _, D = x.shape
    block_t, block_d = _blocks(T, D, rope)
    return block_t, _num_warps(x, block_t, block_d)


def _launch(kernel: str, x: torch.Tensor, args: tuple, meta: dict, config: tuple[int, int] | None) -> None:
    """Launch ``kernel`` over ``x``'s ``[B, T, H]`` with ``config = (BLOCK_T, num_warps)``, autotuned when None."""
    B, T, H, _ = x.shape
    if config is None:
        _grid(B, T, H, 1)  # the batch limit
        grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]), H, B)  # noqa: E731
        with _device_ctx(x):
            _autotuner(kernel)[grid](*args, **meta)
        return
    block_t, num_warps = config
    fn = _kv_shift_fwd_kernel if kernel == "fwd" else _kv_shift_bwd_kernel
    with _device_ctx(x):
        fn[_grid(B, T, H, block_t)](*args, **meta, BLOCK_T=block_t, num_warps=num_warps)


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


def _x_strides(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` as the kernels read it, and its batch, token and head strides in units of ``D``.

    No copy when the head dim has stride 1 and the other strides are multiples of ``D`` (a contiguous x,
    a slice of a fused QKV projection viewed as ``[B, T, H, D]``, a transposed ``[B, H, T, D]``): the
    kernels then still know at compile time that each head vector starts at a multiple of ``D``
    (vector loads). Any other layout is copied once, to a contiguous tensor."""
    B, T, H, D = x.shape
    strides = []
    for size, stride in zip((B, T, H), x.stride()[:3]):
        if size == 1:
            stride = 0  # never stepped over
        elif D == 0 or stride % D:
            break
        strides.append(stride // D if D else 0)
    if len(strides) == 3 and (D <= 1 or x.stride(3) == 1):
        return x, tuple(strides)
    return x.contiguous(), (T * H, H, 1)


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
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns ``[B, H, T, D]`` (``sdpa_layout``) or ``[B, T, H, D]``,
    contiguous (``out`` when given).

    ``keep`` is ``[B, T]`` (True = may read the predecessor) or None; position 0 reads ``prev``
    (times ``keep[:, 0]``) when given, zero otherwise. RoPE is applied when ``cos``/``sin`` are given.
    ``x`` is read in place (see :func:`_x_strides`). ``config = (BLOCK_T, num_warps)`` overrides the
    launch config (tests); the outputs do not depend on it.
    """
    B, T, H, D = x.shape
    N = B * T
    y = x.new_empty(_out_shape(x, sdpa_layout)) if out is None else out
    if N == 0 or H == 0 or D == 0:
        return y
    x, x_strides = _x_strides(x)
    cos_t, sin_t, cs_strides = _rope_args(cos, sin, x)
    prev_c = prev.contiguous() if prev is not None else x
    config = _config(x, cos is not None, config)
    _launch(
        "fwd", x,
        (x, weight, cos_t, sin_t, _keep_u8(keep, x), prev_c, y,
         T, H, D, *x_strides, weight.stride(0), weight.stride(1), *cs_strides),
        dict(HAS_ROPE=cos is not None, HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
             SDPA_LAYOUT=sdpa_layout, BLOCK_D=_blocks(T, D, cos is not None)[1]),
        config,
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
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight, grad_prev)``.

    ``grad_y`` is laid out like the forward's output; ``x`` is read in place (any strides, as in the
    forward); ``grad_x`` is contiguous; ``grad_prev`` is ``[B, H, D]`` (an empty tensor when ``prev`` is
    None). The optional buffers let tests pass NaN-filled outputs (``grad_weight_partial``:
    ``[B * cdiv(T, BLOCK_T), H, 2]`` fp32 for the fixed config, which a given buffer implies unless
    ``config = (BLOCK_T, num_warps)`` names another).
    """
    grad_y = grad_y.contiguous()
    B, T, H, D = x.shape
    N = B * T
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_x is None else grad_x
    if prev is None:  # no grad_prev to compute: an empty stand-in, no allocation or launch
        gp = x.new_empty(0)
    else:
        gp = torch.empty(B, H, D, dtype=prev.dtype, device=x.device) if grad_prev is None else grad_prev
    if N == 0 or H == 0 or D == 0:
        gw = torch.zeros(H, 2, dtype=weight.dtype, device=weight.device)
        return gx.zero_(), gw, gp.zero_()
    x, x_strides = _x_strides(x)
    rope = cos is not None
    if grad_weight_partial is not None and config is None:  # a given buffer is sized for the fixed config
        config = _blocks(T, D, rope)[0], _num_warps(x, *_blocks(T, D, rope))
    config = _config(x, rope, config)
    if grad_weight_partial is None:
        # One row per program. Autotuned: rows for the smallest BLOCK_T, zeroed, as a taller config's
        # programs leave the trailing rows unwritten.
        block_t = min(_AUTOTUNE_BLOCK_T) if config is None else config[0]
        alloc = torch.empty if config is not None else torch.zeros
        grad_weight_partial = alloc(B * triton.cdiv(T, block_t), H, 2, dtype=torch.float32, device=x.device)
    cos_t, sin_t, cs_strides = _rope_args(cos, sin, x)
    prev_c = prev.contiguous() if prev is not None else x
    _launch(
        "bwd", x,
        (grad_y, x, weight, cos_t, sin_t, _keep_u8(keep, x), prev_c, gx, gp, grad_weight_partial,
         T, H, D, *x_strides, weight.stride(0), weight.stride(1), *cs_strides),
        dict(HAS_ROPE=rope, HAS_KEEP=keep is not None, HAS_PREV=prev is not None,
             SDPA_LAYOUT=sdpa_layout, BLOCK_D=_blocks(T, D, rope)[1]),
        config,
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
