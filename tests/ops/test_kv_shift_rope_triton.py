"""Fused Triton KV shift + RoPE + transpose against the reference pieces (CPU: Triton interpreter)."""

import pytest
import torch

triton = pytest.importorskip("triton")  # the interpreter set-up (CPU) is in tests/ops/conftest.py

from kvshift.ops.kv_shift import triton as kernels  # noqa: E402
from kvshift.ops.kv_shift.reference import kv_shift_ref  # noqa: E402
from kvshift.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _inputs(shape, dtype, *, rope: bool, with_keep: bool, with_prev: bool, wdtype=None, seed=0):
    """x, weight, cos, sin, keep, prev and an output gradient ``[B, H, T, D]``."""
    B, T, H, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(H, 2, generator=g).to(DEVICE, wdtype or dtype).requires_grad_()
    prev = torch.randn(B, H, D, generator=g).to(DEVICE, dtype).requires_grad_() if with_prev else None
    keep = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE) if with_keep else None
    cos = sin = None
    if rope:
        pos = torch.randint(0, 100, (B, T), generator=g).to(DEVICE)
        cos, sin = rope_cos_sin(pos, rope_inv_freq(D, 10000.0, DEVICE), dtype)
    gy = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
    return x, w, cos, sin, keep, prev, gy


def _reference(x, w, cos=None, sin=None, keep=None, prev=None):
    """The composition the fused kernel replaces: shift, RoPE, transpose."""
    y = kv_shift_ref(x, w, prev=prev, reset_mask=None if keep is None else ~keep)
    if cos is not None:
        y = apply_rope(y, cos, sin)
    return y.transpose(1, 2)


def _check(shape, dtype, *, rope, with_keep, with_prev, wdtype=None):
    x, w, cos, sin, keep, prev, gy = _inputs(
        shape, dtype, rope=rope, with_keep=with_keep, with_prev=with_prev, wdtype=wdtype
    )
    y = kernels.kv_shift_rope_triton(x, w, cos, sin, keep=keep, prev=prev)
    y_ref = _reference(x, w, cos, sin, keep, prev)
    B, T, H, D = shape
    assert y.dtype == x.dtype and y.shape == (B, H, T, D) and y.is_contiguous()
    tol = _tol(dtype if wdtype in (None, dtype) else torch.bfloat16)
    torch.testing.assert_close(y, y_ref, **tol)

    leaves = [x, w] + ([prev] if prev is not None else [])
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy)
    for name, g, g_ref, leaf in zip(("x", "weight", "prev"), grads, grads_ref, leaves):
        assert g.dtype == leaf.dtype, name
        # grad weight is a sum over B*T*D products: compare relative to its scale.
        scale = g_ref.float().abs().max().clamp_min(1.0) if name == "weight" else 1.0
        torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, **tol, msg=name)


# (B, T, H, D): T = 1, H = 1, T not a multiple of the row block (D = 64 -> 32 rows), D = 64.
ROPE_SHAPES = [(2, 5, 3, 8), (1, 1, 1, 4), (2, 33, 2, 64), (3, 7, 1, 6)]
# Without RoPE the head dim may be odd.
# (2, 130, 2, 64): D 64 without RoPE has 64-row tiles; 130 rows span three, the last one partial.
PLAIN_SHAPES = [(2, 5, 3, 7), (1, 1, 1, 13), (2, 33, 1, 64), (2, 130, 2, 64)]
MASKS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("with_keep,with_prev", MASKS)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_fp32_rope_matches_reference(shape, with_keep, with_prev):
    _check(shape, torch.float32, rope=True, with_keep=with_keep, with_prev=with_prev)


@pytest.mark.parametrize("with_keep,with_prev", MASKS)
@pytest.mark.parametrize("shape", PLAIN_SHAPES)
def test_fp32_no_rope_matches_reference(shape, with_keep, with_prev):
    _check(shape, torch.float32, rope=False, with_keep=with_keep, with_prev=with_prev)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope,shape", [(True, (2, 5, 3, 8)), (True, (2, 33, 1, 64)), (False, (2, 5, 3, 7))])
def test_bf16_matches_reference(rope, shape, wdtype):
    _check(shape, torch.bfloat16, rope=rope, with_keep=True, with_prev=True, wdtype=wdtype)


def test_non_contiguous_x_and_expanded_cos_sin():
    B, T, H, D = 2, 9, 3, 8
    x = torch.randn(B, H, T, D, device=DEVICE).transpose(1, 2)  # [B, T, H, D], not contiguous
    w = torch.randn(H, 2, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(T, device=DEVICE)[None], rope_inv_freq(D, 10000.0, DEVICE), x.dtype)
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # stride 0 over the batch
    y = kernels.kv_shift_rope_triton(x, w, cos, sin)
    torch.testing.assert_close(y, _reference(x, w, cos, sin), atol=1e-6, rtol=1e-6)


def test_masked_nan_does_not_leak():
    """A NaN token whose successor does not keep it stays in its own (padded) output row only."""
    x, w, cos, sin, _, prev, _ = _inputs(
        (2, 6, 2, 8), torch.float32, rope=True, with_keep=False, with_prev=True
    )
    x, prev = x.detach().clone(), prev.detach()
    x[0, 2] = float("nan")
    keep = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    keep[0, 3] = False
    y = kernels.kv_shift_rope_triton(x, w.detach(), cos, sin, keep=keep, prev=prev)
    assert torch.isnan(y[0, :, 2]).all()
    y[0, :, 2] = 0.0
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, _reference(x, w.detach(), cos, sin, keep, prev).nan_to_num(0.0))


@pytest.mark.parametrize("rope", [False, True])
def test_kernels_write_every_element(rope):
    """NaN-filled output buffers: an element the kernels forget to write stays NaN."""
    B, T, H, D = 2, 33, 3, 64
    x, w, cos, sin, keep, prev, gy = _inputs(
        (B, T, H, D), torch.float32, rope=rope, with_keep=True, with_prev=True
    )
    x, w, prev = x.detach(), w.detach(), prev.detach()
    nan = float("nan")
    y = kernels._kv_shift_fwd(x, w, cos, sin, keep, prev, True, out=x.new_full((B, H, T, D), nan))
    torch.testing.assert_close(y, _reference(x, w, cos, sin, keep, prev), **_tol(torch.float32))

    block_t, _ = kernels._blocks(T, D, rope)
    partial = torch.full((B * triton.cdiv(T, block_t), H, 2), nan, device=DEVICE)
    gx, gw, gp = kernels._kv_shift_bwd(
        gy, x, w, cos, sin, keep, prev, True,
        grad_x=torch.full_like(x, nan), grad_prev=torch.full_like(prev, nan), grad_weight_partial=partial,
    )  # fmt: skip
    for t in (gx, gw, gp):
        assert not torch.isnan(t).any()


def test_deterministic_weight_grad():
    x, w, cos, sin, keep, prev, gy = _inputs(
        (2, 33, 3, 64), torch.float32, rope=True, with_keep=True, with_prev=True
    )
    args = (gy, x.detach(), w.detach(), cos, sin, keep, prev.detach(), True)
    for u, v in zip(kernels._kv_shift_bwd(*args), kernels._kv_shift_bwd(*args)):
        assert torch.equal(u, v)


def test_opcheck_custom_ops():
    x, w, cos, sin, keep, prev, gy = _inputs(
        (2, 5, 3, 8), torch.float32, rope=True, with_keep=True, with_prev=True
    )
    torch.library.opcheck(kernels.kv_shift_fwd_op, (x, w, cos, sin, keep, prev, True))
    torch.library.opcheck(kernels.kv_shift_fwd_op, (x, w, None, None, None, None, True))
    # RoPE in x's own [B, T, H, D] layout: no public entry point, but the op accepts it.
    torch.library.opcheck(kernels.kv_shift_fwd_op, (x, w, cos, sin, keep, prev, False))
    torch.library.opcheck(
        kernels.kv_shift_bwd_op, (gy, x.detach(), w.detach(), cos, sin, keep, prev.detach(), True)
    )


def _loss(x, w, cos, sin, keep, prev):
    return kernels.kv_shift_rope_triton(x, w, cos, sin, keep=keep, prev=prev).square().sum()


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    x, w, cos, sin, keep, prev, _ = _inputs(
        (2, 5, 3, 8), torch.float32, rope=True, with_keep=True, with_prev=True
    )
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, cos, sin, keep, prev)
    grads = torch.autograd.grad(loss, [x, w, prev])
    loss_ref = _loss(x, w, cos, sin, keep, prev)
    grads_ref = torch.autograd.grad(loss_ref, [x, w, prev])
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cos=torch.ones(2, 5, 8), sin=None), "cos and sin"),
        (dict(cos=torch.ones(2, 5, 4), sin=torch.ones(2, 5, 8)), "cos must have shape"),
        (dict(cos=torch.ones(2, 5, 8), sin=torch.ones(1, 5, 8)), "sin must have shape"),
        (dict(keep=torch.ones(2, 4, dtype=torch.bool)), "keep must have shape"),
        (dict(prev=torch.ones(2, 3, 4)), "prev must have shape"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    x, w = torch.randn(2, 5, 3, 8), torch.randn(3, 2)
    with pytest.raises(ValueError, match=match):
        kernels.kv_shift_rope_triton(x, w, **kwargs)


def test_rope_needs_even_head_dim():
    x, w = torch.randn(2, 5, 3, 7), torch.randn(3, 2)
    with pytest.raises(ValueError, match="x must have an even head dim"):
        kernels.kv_shift_rope_triton(x, w, torch.ones(2, 5, 7), torch.ones(2, 5, 7))


def test_multi_tile_shapes_span_several_tiles():
    """The shapes above cross a tile boundary at D 64, with RoPE and without (where tiles are twice as tall)."""
    assert any(T > kernels._blocks(T, D, True)[0] for _, T, _, D in ROPE_SHAPES if D == 64)
    assert any(T > 2 * kernels._blocks(T, D, False)[0] for _, T, _, D in PLAIN_SHAPES if D == 64)
