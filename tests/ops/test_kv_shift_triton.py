"""The fused Triton KV shift against the reference, forward and all gradients (CPU: Triton interpreter)."""

import pytest
import torch

triton = pytest.importorskip("triton")  # the interpreter set-up (CPU) is in tests/ops/conftest.py

from kvshift.ops.kv_shift import kv_shift  # noqa: E402
from kvshift.ops.kv_shift import triton as kernels  # noqa: E402
from kvshift.ops.kv_shift.checks import previous_token_keep_mask  # noqa: E402
from kvshift.ops.kv_shift.reference import kv_shift_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, H, D): odd head dims, T = 1, a T that is not a multiple of any block; (2, 130, 2, 64) spans three
# 64-row tiles of D 64 (the last one partial): predecessors and weight-gradient partials across tiles.
SHAPES = [(2, 5, 3, 7), (1, 1, 1, 13), (2, 33, 3, 64), (3, 5, 1, 13), (2, 130, 2, 64)]


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _inputs(shape, dtype, wdtype, seed=0, with_prev=False):
    B, T, H, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(H, 2, generator=g).to(DEVICE, wdtype).requires_grad_()
    prev = torch.randn(B, H, D, generator=g).to(DEVICE, dtype).requires_grad_() if with_prev else None
    gy = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
    return x, w, prev, gy


def _masks(kind: str, B: int, T: int) -> dict:
    kw = {}
    if "pad" in kind:  # left padding, a different amount per row
        am = torch.ones(B, T, dtype=torch.long)
        for b in range(B):
            am[b, : min(b * 2, T - 1)] = 0
        kw["attention_mask"] = am.to(DEVICE)
    if "reset" in kind:
        rm = torch.zeros(B, T, dtype=torch.bool)
        rm[:, T // 2] = True
        rm[0, 0] = True
        kw["reset_mask"] = rm.to(DEVICE)
    if "cu" in kind and B == 1:
        cuts = sorted({0, T} | {c for c in (1, T // 3, T // 2) if 0 < c < T})
        kw["cu_seqlens"] = torch.tensor(cuts, dtype=torch.int32, device=DEVICE)
    return kw


def _check(shape, dtype, wdtype, kind, with_prev):
    x, w, prev, gy = _inputs(shape, dtype, wdtype, with_prev=with_prev)
    kw = _masks(kind, shape[0], shape[1])
    y = kernels.kv_shift_triton(x, w, prev=prev, **kw)
    y_ref = kv_shift_ref(x, w, prev=prev, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert not torch.isnan(y).any()
    tol = _tol(dtype if dtype == wdtype else torch.bfloat16)
    torch.testing.assert_close(y, y_ref, **tol)

    leaves = [x, w] + ([prev] if prev is not None else [])
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy)
    for name, g, g_ref, leaf in zip(
        ("x", "weight", "prev")[: len(leaves)], grads, grads_ref, leaves, strict=True
    ):
        assert g.dtype == leaf.dtype, name
        if name == "weight":
            # A sum over B*T*D products: compare relative to its scale.
            scale = g_ref.float().abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, **tol, msg=name)
        else:
            torch.testing.assert_close(g, g_ref, **tol, msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "kind,with_prev", [("none", False), ("none", True), ("pad+reset", False), ("pad+reset", True)]
)
def test_fp32_matches_reference(shape, kind, with_prev):
    _check(shape, torch.float32, torch.float32, kind, with_prev)


@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_packed_cu_seqlens_matches_reference(T, with_prev):
    _check((1, T, 3, 13), torch.float32, torch.float32, "cu+reset", with_prev)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (2, 33, 1, 64)])
def test_bf16_matches_reference(shape, wdtype):
    _check(shape, torch.bfloat16, wdtype, "pad+reset", True)


def test_non_contiguous_input():
    base = torch.randn(2, 3, 9, 7, device=DEVICE)  # [B, H, T, D]
    x = base.transpose(1, 2)  # [B, T, H, D], not contiguous
    w = torch.randn(3, 2, device=DEVICE)
    torch.testing.assert_close(kernels.kv_shift_triton(x, w), kv_shift_ref(x, w), atol=1e-6, rtol=1e-6)


def test_dispatcher_triton_backend():
    x, w, prev, _ = _inputs((2, 5, 3, 7), torch.float32, torch.float32, with_prev=True)
    y = kv_shift(x, w, prev=prev, backend="triton")
    torch.testing.assert_close(y, kv_shift_ref(x, w, prev=prev), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("with_prev", [False, True])
def test_kernels_write_every_element(with_prev):
    """NaN-filled output buffers: an element the kernels forget to write stays NaN."""
    B, T, H, D = 2, 33, 3, 13
    x, w, prev, gy = _inputs((B, T, H, D), torch.float32, torch.float32, with_prev=with_prev)
    x, w = x.detach(), w.detach()
    prev = prev.detach() if prev is not None else None
    am = _masks("pad", B, T)["attention_mask"]
    keep = previous_token_keep_mask(B, T, x.device, attention_mask=am, has_prev=True)
    nan = float("nan")
    y = kernels._kv_shift_fwd(x, w, None, None, keep, prev, False, out=torch.full_like(x, nan))
    torch.testing.assert_close(y, kv_shift_ref(x, w, prev=prev, attention_mask=am), atol=1e-6, rtol=1e-6)

    block_t, _ = kernels._blocks(T, D, False)
    partial = torch.full((B * triton.cdiv(T, block_t), H, 2), nan, device=DEVICE)
    gp_buf = torch.full((B, H, D), nan, device=DEVICE) if with_prev else None
    gx, gw, gp = kernels._kv_shift_bwd(
        gy, x, w, None, None, keep, prev, False,
        grad_x=torch.full_like(x, nan), grad_prev=gp_buf, grad_weight_partial=partial,
    )  # fmt: skip
    for t in (gx, gw, gp):
        assert not torch.isnan(t).any()


def test_deterministic_weight_grad():
    x, w, prev, gy = _inputs((2, 33, 3, 64), torch.float32, torch.float32, with_prev=True)
    args = (gy, x.detach(), w.detach(), None, None, None, prev.detach(), False)
    for u, v in zip(kernels._kv_shift_bwd(*args), kernels._kv_shift_bwd(*args), strict=True):
        assert torch.equal(u, v)


def test_opcheck_custom_ops():
    x, w, prev, gy = _inputs((2, 5, 3, 7), torch.float32, torch.float32, with_prev=True)
    keep = previous_token_keep_mask(
        2, 5, x.device, attention_mask=_masks("pad", 2, 5)["attention_mask"], has_prev=True
    )
    torch.library.opcheck(kernels.kv_shift_fwd_op, (x, w, None, None, keep, prev, False))
    torch.library.opcheck(kernels.kv_shift_fwd_op, (x, w, None, None, None, None, False))
    torch.library.opcheck(
        kernels.kv_shift_bwd_op, (gy, x.detach(), w.detach(), None, None, keep, prev.detach(), False)
    )


def _loss(x, w, prev, am):
    return kernels.kv_shift_triton(x, w, prev=prev, attention_mask=am).square().sum()


def _check_compiled(backend: str):
    x, w, prev, _ = _inputs((2, 5, 3, 7), torch.float32, torch.float32, with_prev=True)
    am = _masks("pad", 2, 5)["attention_mask"]
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    loss = compiled(x, w, prev, am)
    grads = torch.autograd.grad(loss, [x, w, prev])
    loss_ref = kv_shift_ref(x, w, prev=prev, attention_mask=am).square().sum()
    grads_ref = torch.autograd.grad(loss_ref, [x, w, prev])
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _check_compiled("inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_large():
    B, T, H, D = 2, 1000, 8, 128
    x, w, prev, gy = _inputs((B, T, H, D), torch.bfloat16, torch.float32, with_prev=True)
    assert x.is_cuda
    kw = _masks("pad+reset", B, T)
    y = kv_shift(x, w, prev=prev, backend="auto", **kw)  # auto picks Triton on CUDA
    y_ref = kv_shift_ref(x, w, prev=prev, **kw)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    gs = torch.autograd.grad(y, [x, w, prev], gy)
    gs_ref = torch.autograd.grad(y_ref, [x, w, prev], gy)
    for g, g_ref in zip(gs, gs_ref, strict=True):
        scale = g_ref.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, atol=2e-2, rtol=2e-2)
