"""The fused Triton KV shift reads a non-contiguous x in place (issue 28 item 6), and its autotuned launch
configs give the same outputs as the fixed one (CPU: Triton interpreter, set up in tests/ops/conftest.py).

A slice of a fused QKV projection viewed as ``[B, T, H, D]`` has token and batch strides larger than
``H * D``: forward and backward pass the strides to the kernels instead of copying x, and autograd saves x
itself."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kvshift.ops.kv_shift import triton as kernels  # noqa: E402
from kvshift.ops.kv_shift.reference import kv_shift_ref  # noqa: E402
from kvshift.ops.rope import apply_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``x``'s values (``[B, T, H, D]``) in another memory layout."""
    B, T, H, D = x.shape
    if layout == "qkv":  # the k slice of a fused [B, T, 3 * H * D] projection: token stride 3 * H * D
        qkv = torch.randn(B, T, 3, H * D, device=x.device).to(x.dtype)
        qkv[:, :, 1] = x.reshape(B, T, H * D)
        return qkv.flatten(2)[..., H * D : 2 * H * D].unflatten(-1, (H, D))
    if layout == "heads-first":  # [B, H, T, D] transposed
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded-head":  # head vectors D + 3 apart: strides not multiples of D (copied)
        pad = torch.zeros(B, T, H, D + 3, device=x.device, dtype=x.dtype)
        pad[..., :D] = x
        return pad[..., :D]
    if layout == "strided-dim":  # stride 2 in the head dim (copied)
        wide = torch.zeros(B, T, H, D, 2, device=x.device, dtype=x.dtype)
        wide[..., 0] = x
        return wide[..., 0]
    raise ValueError(layout)


def _inputs(shape, dtype, *, rope, with_keep, with_prev, seed=0):
    """The fused-kernel tests' inputs (the same draws), as plain tensors: these tests lay x out themselves."""
    from test_kv_shift_rope_triton import _inputs as rope_inputs

    drawn = rope_inputs(shape, dtype, rope=rope, with_keep=with_keep, with_prev=with_prev, seed=seed)
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in drawn)


def _rope_reference(x, w, cos, sin, keep, prev):
    y = kv_shift_ref(x, w, prev=prev, reset_mask=None if keep is None else ~keep)
    return (apply_rope(y, cos, sin) if cos is not None else y).transpose(1, 2)


def _run(fn, x, w, prev, gy):
    """Output and gradients (x, weight, prev) of ``fn(x, w, prev)``; x may be a non-leaf view."""
    w = w.detach().requires_grad_()
    prev = prev.detach().requires_grad_() if prev is not None else None
    y = fn(x, w, prev)
    leaves = [x, w] + ([prev] if prev is not None else [])
    return y, torch.autograd.grad(y, leaves, gy)


def _compare(shape, dtype, layout, fn, ref, *, rope=False, with_keep=False, with_prev=False, gy=None):
    x, w, cos, sin, keep, prev, gy_rope = _inputs(
        shape, dtype, rope=rope, with_keep=with_keep, with_prev=with_prev
    )
    gy = gy_rope if gy is None else gy
    x_leaf = x.clone().requires_grad_()
    x_nc = _strided(x_leaf, layout)  # a differentiable non-contiguous view with x's values
    assert not x_nc.is_contiguous() and torch.equal(x_nc, x)
    x_c = x.clone().requires_grad_()

    y_nc, g_nc = _run(lambda a, b, c: fn(a, b, cos, sin, keep, c), x_nc, w, prev, gy)
    y_c, g_c = _run(lambda a, b, c: fn(a, b, cos, sin, keep, c), x_c, w, prev, gy)
    y_ref, g_ref = _run(lambda a, b, c: ref(a, b, cos, sin, keep, c), x_c, w, prev, gy)

    # The same kernels on the same values: bitwise equal to the contiguous copy.
    assert torch.equal(y_nc, y_c)
    for name, a, b in zip(("x", "weight", "prev"), g_nc, g_c):
        assert torch.equal(a, b), name
    tol = _tol(dtype)
    torch.testing.assert_close(y_nc, y_ref, **tol)
    for name, a, b in zip(("x", "weight", "prev"), g_nc, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.float().abs().max().clamp_min(1.0) if name == "weight" else 1.0  # a sum of B*T*D products
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol, msg=name)


def _rope_fn(x, w, cos, sin, keep, prev):
    return kernels.kv_shift_rope_triton(x, w, cos, sin, keep=keep, prev=prev)


MASKS = [(False, False), (True, True), (False, True)]


@pytest.mark.parametrize("with_keep,with_prev", MASKS)
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_slice_matches_contiguous_and_reference(dtype, rope, with_keep, with_prev):
    # T 33 at D 64 spans two RoPE tiles (32 rows): predecessors across a tile boundary.
    _compare(
        (2, 33, 2, 64),
        dtype,
        "qkv",
        _rope_fn,
        _rope_reference,
        rope=rope,
        with_keep=with_keep,
        with_prev=with_prev,
    )


@pytest.mark.parametrize("layout", ["qkv", "heads-first", "padded-head", "strided-dim"])
@pytest.mark.parametrize("rope,shape", [(True, (2, 5, 3, 8)), (False, (2, 5, 3, 7)), (True, (1, 4, 1, 6))])
def test_layouts_match_contiguous_and_reference(layout, rope, shape):
    if shape[2] == 1 and layout == "heads-first":  # with one head, [B, H, T, D] transposed is contiguous
        pytest.skip("contiguous")
    _compare(
        shape, torch.float32, layout, _rope_fn, _rope_reference, rope=rope, with_keep=True, with_prev=True
    )


def _plain_kwargs(kind: str, B: int, T: int) -> dict:
    kw = {}
    if kind == "cu":
        kw["cu_seqlens"] = torch.tensor([0, 1, T // 2, T], dtype=torch.int32, device=DEVICE)
    if kind == "pad+reset":
        am = torch.ones(B, T, dtype=torch.long, device=DEVICE)
        am[-1, :2] = 0
        rm = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
        rm[:, T // 2] = True
        kw.update(attention_mask=am, reset_mask=rm)
    return kw


@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize(
    "kind,shape", [("none", (2, 70, 2, 64)), ("cu", (1, 11, 3, 7)), ("pad+reset", (2, 9, 3, 13))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_op_qkv_slice_matches_contiguous_and_reference(dtype, kind, shape, with_prev):
    """``kv_shift_triton`` ([B, T, H, D] out), with cu_seqlens / padding / resets and prev as in
    test_kv_shift_triton.py; (2, 70, 2, 64) spans two 64-row tiles."""
    kw = _plain_kwargs(kind, shape[0], shape[1])
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    _compare(
        shape, dtype, "qkv",
        lambda x, w, cos, sin, keep, prev: kernels.kv_shift_triton(x, w, prev=prev, **kw),
        lambda x, w, cos, sin, keep, prev: kv_shift_ref(x, w, prev=prev, **kw),
        with_prev=with_prev, gy=gy,
    )  # fmt: skip


@pytest.mark.parametrize("rope", [True, False])
def test_no_copy_of_x_in_forward_or_backward(monkeypatch, rope):
    """Fails before the strides were passed: x.contiguous() made a copy in forward and again in backward."""
    x, w, cos, sin, keep, prev, gy = _inputs(
        (2, 9, 3, 8), torch.float32, rope=rope, with_keep=True, with_prev=True
    )
    x_leaf = x.clone().requires_grad_()
    x_nc = _strided(x_leaf, "qkv")
    w.requires_grad_()
    storage = x_nc.untyped_storage().data_ptr()

    copies = []
    real_contiguous, real_clone = torch.Tensor.contiguous, torch.Tensor.clone

    def _records(name, real):
        def spy(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() == storage:
                copies.append((name, tuple(self.stride())))
            return real(self, *args, **kwargs)

        return spy

    saved = []

    def pack(t):
        saved.append(t)
        return t

    monkeypatch.setattr(torch.Tensor, "contiguous", _records("contiguous", real_contiguous))
    monkeypatch.setattr(torch.Tensor, "clone", _records("clone", real_clone))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kernels.kv_shift_rope_triton(x_nc, w, cos, sin, keep=keep, prev=prev)
    assert copies == [], f"forward copied x: {copies}"
    # What autograd keeps for the backward is x itself: its storage and strides, no copy.
    assert any(t.untyped_storage().data_ptr() == storage and t.stride() == x_nc.stride() for t in saved)
    gx, gw = torch.autograd.grad(y, [x_nc, w], gy)
    assert copies == [], f"backward copied x: {copies}"
    monkeypatch.undo()
    torch.testing.assert_close(
        gx, torch.autograd.grad(_rope_reference(x_nc, w, cos, sin, keep, prev), x_nc, gy)[0]
    )


def test_only_unaddressable_layouts_are_copied():
    x = torch.randn(2, 5, 3, 8)
    for layout, copied in (
        ("qkv", False),
        ("heads-first", False),
        ("padded-head", True),
        ("strided-dim", True),
    ):
        x_nc = _strided(x, layout)
        x_k, strides = kernels._x_strides(x_nc)
        assert (x_k.data_ptr() != x_nc.data_ptr()) == copied, layout
        assert torch.equal(x_k, x)
        if not copied:
            assert tuple(s * 8 for s in strides) == x_nc.stride()[:3], layout
    # Size-1 dims may carry any stride: never stepped over, never a reason to copy.
    odd = torch.randn(100).as_strided((1, 5, 1, 8), (7, 16, 3, 1))
    assert kernels._x_strides(odd)[0] is odd


# --- autotuning -------------------------------------------------------------------------------------------


def test_autotuner_configs_key_and_restored_outputs():
    assert kernels._AUTOTUNE_KEY == ["D", "HAS_ROPE"]  # + every tensor argument's dtype (Triton adds them)
    for name in ("fwd", "bwd"):
        tuner = kernels._autotuner(name)
        assert tuner.keys == ["D", "HAS_ROPE"]
        got = {(c.kwargs["BLOCK_T"], c.num_warps) for c in tuner.configs}
        assert got == {(bt, w) for bt in (16, 32, 64) for w in (2, 4, 8)}
        # Nothing is accumulated: the forward and the gradients of x and prev are stored once per element.
        # The weight-gradient partials have one row per program; a taller config writes fewer rows, so their
        # zeroed buffer is restored after every benchmark run.
        assert list(tuner.reset_to_zero) == []
        assert list(tuner.restore_value) == (["GW_PART"] if name == "bwd" else [])


@pytest.mark.parametrize(
    "rope,D", [(True, 64), (True, 128), (True, 256), (False, 64), (False, 256), (True, 512)]
)
def test_pruned_configs_stay_within_the_fixed_tile_budget(rope, D):
    configs = kernels._autotune_configs()
    kept = kernels._prune_configs(configs, {"D": D}, HAS_ROPE=rope, BLOCK_D=D)
    assert kept
    budget = (kernels._MAX_TILE_ROPE if rope else kernels._MAX_TILE) / 128
    if D <= 256:
        assert all(c.kwargs["BLOCK_T"] * D / (32 * c.num_warps) <= budget for c in kept)
    else:  # nothing fits: the config with the fewest elements per thread
        assert [(c.kwargs["BLOCK_T"], c.num_warps) for c in kept] == [(16, 8)]


def test_interpreter_and_small_launches_take_the_fixed_config():
    assert not kernels._autotune(torch.empty(2, 9, 3, 8, device=DEVICE))  # interpreted here, or too small
    x = torch.empty(2, 33, 2, 64)
    block_t, block_d = kernels._blocks(33, 64, True)
    assert kernels._config(x, True, None) == (block_t, kernels._num_warps(x, block_t, block_d))


class _ChosenConfig:
    """Stands in for Triton's autotuner (which needs a GPU to time configs) as if it had picked ``config``:
    the launch goes through the autotuned host path (grid callable, zeroed partials for the smallest BLOCK_T)."""

    def __init__(self, fn, config):
        self.fn, self.config = fn, config

    def __getitem__(self, grid):
        def launch(*args, **meta):
            block_t, num_warps = self.config
            self.fn[grid({**meta, "BLOCK_T": block_t})](*args, **meta, BLOCK_T=block_t, num_warps=num_warps)

        return launch


@pytest.mark.parametrize("rope,shape", [(True, (2, 70, 2, 16)), (False, (2, 70, 3, 7))])
def test_outputs_do_not_depend_on_the_chosen_config(monkeypatch, rope, shape):
    """Every config of the autotuner, launched through the autotuned path, gives the fixed config's outputs:
    y, grad x and grad prev bitwise, grad weight to rounding (partial sums grouped by BLOCK_T). T 70 spans
    several tiles of every BLOCK_T; the last one partial."""
    x, w, cos, sin, keep, prev, gy = _inputs(shape, torch.float32, rope=rope, with_keep=True, with_prev=True)
    x = _strided(x, "qkv")
    fixed_y = kernels._kv_shift_fwd(x, w, cos, sin, keep, prev, True)
    fixed_g = kernels._kv_shift_bwd(gy, x, w, cos, sin, keep, prev, True)
    assert kernels._config(x, rope, None) is not None  # the fixed config here

    monkeypatch.setattr(kernels, "_autotune", lambda x: True)
    seen = set()
    for cfg in kernels._autotune_configs():
        chosen = (cfg.kwargs["BLOCK_T"], cfg.num_warps)
        fns = {"fwd": kernels._kv_shift_fwd_kernel, "bwd": kernels._kv_shift_bwd_kernel}
        monkeypatch.setattr(kernels, "_autotuner", lambda name, c=chosen: _ChosenConfig(fns[name], c))
        y = kernels._kv_shift_fwd(x, w, cos, sin, keep, prev, True)
        gx, gw, gp = kernels._kv_shift_bwd(gy, x, w, cos, sin, keep, prev, True)
        assert torch.equal(y, fixed_y), chosen
        assert torch.equal(gx, fixed_g[0]) and torch.equal(gp, fixed_g[2]), chosen
        torch.testing.assert_close(gw, fixed_g[1], atol=1e-5, rtol=1e-5, msg=str(chosen))
        seen.add(chosen[0])
    assert seen == {16, 32, 64}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a GPU to time configs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_launch_matches_fixed_config_on_gpu(dtype):
    """A launch big enough to autotune (B * T * H >= _AUTOTUNE_MIN_ROWS) against the fixed config."""
    shape = (2, 4096, 8, 128)
    x, w, cos, sin, keep, prev, gy = _inputs(shape, dtype, rope=True, with_keep=True, with_prev=True)
    assert kernels._autotune(x)
    args = (x, w, cos, sin, keep, prev, True)
    fixed = (kernels._blocks(4096, 128, True)[0], 4)  # today's fixed config for bf16 / fp32 at D 128
    y = kernels._kv_shift_fwd(*args)
    y_fixed = kernels._kv_shift_fwd(*args, config=fixed)
    assert torch.equal(y, y_fixed)
    g = kernels._kv_shift_bwd(gy, *args)
    g_fixed = kernels._kv_shift_bwd(gy, *args, config=fixed)
    assert torch.equal(g[0], g_fixed[0]) and torch.equal(g[2], g_fixed[2])
    torch.testing.assert_close(g[1].float(), g_fixed[1].float(), atol=1e-3, rtol=1e-3)
