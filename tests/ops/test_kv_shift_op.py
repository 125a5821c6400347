"""The kv_shift op: hand-computed semantics, boundaries, gradients, properties and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshift import kv_shift, kv_shift_ref


def loop_shift(x, w, *, cu_seqlens=None, attention_mask=None, prev=None):
    """Explicit per-element loop: the most literal reading of the contract."""
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    starts = set(cu_seqlens.tolist()[:-1]) if cu_seqlens is not None else {0}
    for b in range(B):
        for t in range(T):
            for h in range(H):
                if t == 0:
                    p = prev[b, h] if prev is not None else torch.zeros(D, dtype=x.dtype)
                elif t in starts or (attention_mask is not None and attention_mask[b, t - 1] == 0):
                    p = torch.zeros(D, dtype=x.dtype)
                else:
                    p = x[b, t - 1, h]
                y[b, t, h] = w[h, 0] * x[b, t, h] + w[h, 1] * p
    return y


def test_hand_computed():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1)
    w = torch.tensor([[0.5, 0.25]])
    y = kv_shift(x, w).flatten().tolist()
    assert y == [0.5, 0.5 * 2 + 0.25 * 1, 0.5 * 4 + 0.25 * 2, 0.5 * 8 + 0.25 * 4]


def test_first_token_sees_zero_not_last_token():
    # torch.roll would put x[T-1] at position 0
    x = torch.randn(2, 5, 3, 4)
    w = torch.tensor([[0.0, 1.0]] * 3)
    y = kv_shift(x, w)
    assert torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))
    assert torch.equal(y[:, 1:], x[:, :-1])


def test_prev_is_used_at_position_zero():
    x = torch.randn(2, 3, 2, 4)
    prev = torch.randn(2, 2, 4)
    w = torch.tensor([[0.3, 0.7], [1.5, -0.5]])
    y = kv_shift(x, w, prev=prev)
    assert torch.allclose(y[:, 0], x[:, 0] * w[:, 0, None] + prev * w[:, 1, None])


def test_causality():
    x = torch.randn(1, 8, 2, 3)
    w = torch.randn(2, 2)
    y = kv_shift(x, w)
    x2 = x.clone()
    x2[:, 5:] = torch.randn_like(x2[:, 5:])
    y2 = kv_shift(x2, w)
    assert torch.equal(y[:, :5], y2[:, :5])


def test_cu_seqlens_resets_and_packed_equals_separate():
    lens = [3, 1, 5]
    docs = [torch.randn(1, n, 2, 4) for n in lens]
    w = torch.randn(2, 2)
    packed = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    y = kv_shift(packed, w, cu_seqlens=cu)
    ref = torch.cat([kv_shift(d, w) for d in docs], dim=1)
    assert torch.allclose(y, ref, atol=0, rtol=0)
    assert torch.allclose(y, loop_shift(packed, w, cu_seqlens=cu))


def test_reset_mask_matches_cu_seqlens():
    x = torch.randn(1, 9, 2, 4)
    w = torch.randn(2, 2)
    reset = torch.zeros(1, 9, dtype=torch.bool)
    reset[0, [3, 4]] = True
    cu = torch.tensor([0, 3, 4, 9])
    assert torch.equal(kv_shift(x, w, reset_mask=reset), kv_shift(x, w, cu_seqlens=cu))


def test_left_padding_equals_unpadded_and_pads_do_not_leak():
    w = torch.randn(3, 2)
    real = torch.randn(1, 4, 3, 5)
    padded = torch.cat([torch.full((1, 2, 3, 5), float("nan")), real], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    y = kv_shift(padded, w, attention_mask=mask)
    assert torch.allclose(y[:, 2:], kv_shift(real, w))


def test_right_and_middle_padding():
    x = torch.randn(2, 6, 2, 3)
    w = torch.randn(2, 2)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert torch.allclose(kv_shift(x, w, attention_mask=mask), loop_shift(x, w, attention_mask=mask), atol=1e-6)


def test_chunked_with_prev_equals_full():
    x = torch.randn(2, 10, 2, 4)
    w = torch.randn(2, 2)
    full = kv_shift(x, w)
    parts, prev = [], None
    for a, b in [(0, 3), (3, 4), (4, 10)]:
        parts.append(kv_shift(x[:, a:b], w, prev=prev))
        prev = x[:, b - 1]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-6)


def test_output_dtype_follows_x_with_fp32_weights():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    w = torch.randn(2, 2, dtype=torch.float32)
    y = kv_shift(x, w)
    assert y.dtype == torch.bfloat16
    ref = (x.float() * w[:, 0, None] + torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).float() * w[:, 1, None])
    assert torch.allclose(y.float(), ref, atol=1e-2, rtol=1e-2)


def test_gradcheck_float64():
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]])
    assert torch.autograd.gradcheck(lambda a, b, c: kv_shift(a, b, prev=c, attention_mask=mask), (x, w, prev))
    cu = torch.tensor([0, 2, 5])
    x1 = torch.randn(1, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kv_shift(a, b, cu_seqlens=cu), (x1, w))


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 9), H=st.integers(1, 4), D=st.integers(1, 6),
    use_prev=st.booleans(), use_mask=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_matches_loop(B, T, H, D, use_prev, use_mask, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    w = torch.randn(H, 2, generator=g, dtype=torch.float64)
    prev = torch.randn(B, H, D, generator=g, dtype=torch.float64) if use_prev else None
    mask = (torch.rand(B, T, generator=g) > 0.3).long() if use_mask else None
    y = kv_shift(x, w, prev=prev, attention_mask=mask)
    assert torch.allclose(y, loop_shift(x, w, prev=prev, attention_mask=mask))


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_property_packed_equals_separate(lens, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 2, generator=g)
    docs = [torch.randn(1, n, 2, 3, generator=g) for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    y = kv_shift(torch.cat(docs, 1), w, cu_seqlens=cu)
    assert torch.equal(y, torch.cat([kv_shift(d, w) for d in docs], 1))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(x=torch.randn(2, 3, 4), weight=torch.randn(4, 2)), "x"),
        (dict(x=torch.randn(1, 3, 4, 2), weight=torch.randn(4, 3)), "weight"),
        (dict(x=torch.randn(1, 3, 4, 2), weight=torch.randn(2, 2)), "weight"),
        (dict(x=torch.randn(1, 3, 4, 2), weight=torch.randn(4)), "weight"),
        (dict(x=torch.randn(1, 5, 2, 2), weight=torch.randn(2, 2), cu_seqlens=torch.tensor([0, 3, 2, 5])), "cu_seqlens"),
        (dict(x=torch.randn(1, 5, 2, 2), weight=torch.randn(2, 2), cu_seqlens=torch.tensor([1, 3, 5])), "cu_seqlens"),
        (dict(x=torch.randn(1, 5, 2, 2), weight=torch.randn(2, 2), cu_seqlens=torch.tensor([0, 3, 4])), "cu_seqlens"),
        (dict(x=torch.randn(2, 5, 2, 2), weight=torch.randn(2, 2), cu_seqlens=torch.tensor([0, 5])), "cu_seqlens"),
        (dict(x=torch.randn(2, 5, 2, 2), weight=torch.randn(2, 2), attention_mask=torch.ones(2, 4)), "attention_mask"),
        (dict(x=torch.randn(2, 5, 2, 2), weight=torch.randn(2, 2), attention_mask=torch.ones(5)), "attention_mask"),
        (dict(x=torch.randn(2, 5, 2, 2), weight=torch.randn(2, 2), prev=torch.randn(2, 2)), "prev"),
        (dict(x=torch.randn(2, 5, 2, 2), weight=torch.randn(2, 2), prev=torch.randn(1, 2, 2)), "prev"),
    ],
)
def test_bad_input_names_the_argument(kwargs, arg):
    x = kwargs.pop("x")
    w = kwargs.pop("weight")
    with pytest.raises(ValueError, match=arg):
        kv_shift(x, w, **kwargs)
    with pytest.raises(ValueError, match=arg):
        kv_shift_ref(x, w, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_each_backend(backend):
    x = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]])
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[1, 4] = True
    fn = lambda a, b, c: kv_shift(a, b, prev=c, attention_mask=mask, reset_mask=reset, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, prev))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 9), H=st.integers(1, 3), D=st.integers(1, 5),
       use_prev=st.booleans(), use_mask=st.booleans(), use_reset=st.booleans(), seed=st.integers(0, 2**16))
def test_property_torch_backend_equals_reference_with_grads(B, T, H, D, use_prev, use_mask, use_reset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(H, 2, generator=g, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(B, H, D, generator=g, dtype=torch.float64, requires_grad=True) if use_prev else None
    kw = dict(prev=prev,
              attention_mask=(torch.rand(B, T, generator=g) > 0.3).long() if use_mask else None,
              reset_mask=(torch.rand(B, T, generator=g) > 0.7) if use_reset else None)
    gy = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    leaves = [x, w] + ([prev] if use_prev else [])
    a = kv_shift(x, w, backend="torch", **kw)
    b = kv_shift(x, w, backend="reference", **kw)
    assert torch.allclose(a, b)
    for ga, gb in zip(torch.autograd.grad(a, leaves, gy), torch.autograd.grad(b, leaves, gy)):
        assert torch.allclose(ga, gb)


def test_torch_backend_nan_in_padding_does_not_leak():
    x = torch.randn(1, 5, 2, 3)
    x[0, :2] = float("nan")
    x.requires_grad_(True)
    w = torch.randn(2, 2, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    y = kv_shift(x, w, attention_mask=mask, backend="torch")
    assert torch.isfinite(y[:, 2:]).all()
    (gx,) = torch.autograd.grad(y[:, 2:].sum(), (x,))
    assert torch.isfinite(gx[:, 2:]).all()


def test_decode_step_equals_the_op_and_checks_shapes():
    from kvshift.ops.kv_shift import kv_shift_step

    g = torch.Generator().manual_seed(3)
    x, prev = torch.randn(3, 1, 2, 5, generator=g), torch.randn(3, 1, 2, 5, generator=g)
    w = torch.randn(2, 2, generator=g)
    torch.testing.assert_close(kv_shift_step(x, w, prev), kv_shift_ref(x, w, prev=prev[:, 0]), atol=1e-6, rtol=0)
    out = kv_shift_step(x.bfloat16(), w, prev.bfloat16())  # fp32 weights, bf16 activations: x's dtype out
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x must be"):
        kv_shift_step(torch.randn(3, 2, 2, 5), w, torch.randn(3, 2, 2, 5))
    with pytest.raises(ValueError, match="prev"):
        kv_shift_step(x, w, prev[:2])
    with pytest.raises(ValueError, match="weight"):
        kv_shift_step(x, torch.randn(3, 2), prev)


@pytest.mark.parametrize("use_prev", [False, True])
def test_torch_backend_traces_fullgraph_and_matches_eager(use_prev):
    """Under torch.compile the torch backend runs out of place (Dynamo cannot trace its in-place custom
    autograd); values and gradients equal the eager backend's, masks and prev included."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 4, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    prev = torch.randn(2, 3, 4, requires_grad=True) if use_prev else None
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    reset = torch.zeros(2, 7, dtype=torch.bool)
    reset[1, 4] = True

    def f(x, w, prev):
        return kv_shift(x, w, prev=prev, attention_mask=mask, reset_mask=reset, backend="torch")

    inputs = [t for t in (x, w, prev) if t is not None]
    eager = f(x, w, prev)
    g_eager = torch.autograd.grad(eager.square().sum(), inputs)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(x, w, prev)
    g_comp = torch.autograd.grad(compiled.square().sum(), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
