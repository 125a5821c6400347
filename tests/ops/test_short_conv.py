"""The causal short convolution (the generalised KV shift) against its literal loop definition: every window,
per head and per channel, document starts, padding and prev; gradients in float64; W = 2 per head is
exactly kv_shift; chunking with prev (the last W - 1 raw rows) equals the full sequence."""

from __future__ import annotations

import pytest
import torch

from kvshift import kv_shift
from kvshift.ops.short_conv import short_conv, short_conv_ref


def _weight(H, D, W, per_channel, gen, dtype=torch.float32):
    shape = (H, D, W) if per_channel else (H, W)
    return torch.randn(*shape, generator=gen).to(dtype)


def _masks(kind: str, B: int, T: int) -> dict:
    if kind == "none":
        return {}
    if kind == "pad":
        am = torch.ones(B, T, dtype=torch.long)
        am[0, :3] = 0  # left padding
        am[-1, T - 2:] = 0  # right padding
        return {"attention_mask": am}
    if kind == "reset":
        rm = torch.zeros(B, T, dtype=torch.bool)
        rm[0, 4] = rm[-1, 1] = rm[-1, 6] = True
        return {"reset_mask": rm}
    if kind == "reset0":  # a chunk that starts a new document: prev must not be read
        rm = torch.zeros(B, T, dtype=torch.bool)
        rm[:, 0] = True
        return {"reset_mask": rm}
    raise ValueError(kind)


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
@pytest.mark.parametrize("kind", ["none", "pad", "reset", "reset0"])
@pytest.mark.parametrize("with_prev", [False, True], ids=["no_prev", "prev"])
def test_matches_the_loop_definition(W, per_channel, kind, with_prev):
    g = torch.Generator().manual_seed(W * 7 + per_channel)
    B, T, H, D = 2, 9, 3, 4
    x = torch.randn(B, T, H, D, generator=g)
    w = _weight(H, D, W, per_channel, g)
    prev = torch.randn(B, W - 1, H, D, generator=g) if with_prev else None
    masks = _masks(kind, B, T)
    torch.testing.assert_close(short_conv(x, w, prev=prev, **masks), short_conv_ref(x, w, prev=prev, **masks),
                               rtol=1e-6, atol=1e-6)


def test_cu_seqlens_equals_reset_mask_and_packed_equals_separate():
    g = torch.Generator().manual_seed(0)
    lens = [3, 1, 5, 2]
    x = torch.randn(1, sum(lens), 2, 4, generator=g)
    w = _weight(2, 4, 3, True, g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    rm = torch.zeros(1, sum(lens), dtype=torch.bool)
    rm[0, cu[1:-1].long()] = True
    packed = short_conv(x, w, cu_seqlens=cu)
    torch.testing.assert_close(packed, short_conv(x, w, reset_mask=rm))
    separate = torch.cat([short_conv(x[:, a:b], w) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(packed, separate)


@pytest.mark.parametrize("kind", ["none", "pad", "reset", "reset0"])
@pytest.mark.parametrize("with_prev", [False, True], ids=["no_prev", "prev"])
def test_window_2_per_head_is_kv_shift(kind, with_prev):
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 9, 3, 5
    x, w = torch.randn(B, T, H, D, generator=g), torch.randn(H, 2, generator=g)
    prev = torch.randn(B, H, D, generator=g) if with_prev else None
    masks = _masks(kind, B, T)
    torch.testing.assert_close(short_conv(x, w, prev=None if prev is None else prev[:, None], **masks),
                               kv_shift(x, w, prev=prev, backend="reference", **masks), rtol=0, atol=1e-6)


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
def test_chunks_with_prev_equal_the_full_sequence(W, per_channel):
    """prev = the last W - 1 raw rows seen so far, zeros where the sequence had fewer."""
    g = torch.Generator().manual_seed(2)
    B, T, H, D = 2, 11, 2, 3
    x = torch.randn(B, T, H, D, generator=g)
    w = _weight(H, D, W, per_channel, g)
    full = short_conv(x, w)
    outs, start = [], 0
    for size in (1, 3, 2, 5):
        seen = x[:, :start]
        head = torch.cat([x.new_zeros(B, W - 1, H, D), seen], dim=1)[:, -(W - 1):]
        outs.append(short_conv(x[:, start:start + size], w, prev=head if start else None))
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "channel"])
def test_gradcheck_float64(per_channel):
    g = torch.Generator().manual_seed(3)
    B, T, H, D, W = 2, 8, 2, 3, 3
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = _weight(H, D, W, per_channel, g, torch.float64).requires_grad_()
    prev = torch.randn(B, W - 1, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    masks = {**_masks("pad", B, T), **_masks("reset", B, T)}
    assert torch.autograd.gradcheck(lambda a, b, c: short_conv(a, b, prev=c, **masks), (x, w, prev))


def test_nan_in_padding_does_not_leak():
    x = torch.randn(1, 6, 1, 2)
    x[0, :2] = float("nan")
    am = torch.tensor([[0, 0, 1, 1, 1, 1]])
    y = short_conv(x, torch.randn(1, 2, 4), attention_mask=am)
    assert torch.isfinite(y[0, 2:]).all()


@pytest.mark.parametrize("kwargs, arg", [
    ({"weight": torch.randn(3, 2)}, "weight"),
    ({"weight": torch.randn(2, 5, 3)}, "weight"),
    ({"weight": torch.randn(2, 9)}, "window"),
    ({"prev": torch.randn(2, 1, 2, 4)}, "prev"),
    ({"attention_mask": torch.ones(2, 5)}, "attention_mask"),
    ({"reset_mask": torch.ones(1, 6, dtype=torch.bool)}, "reset_mask"),
])
def test_bad_input_names_the_argument(kwargs, arg):
    args = {"weight": torch.randn(2, 3), **kwargs}
    with pytest.raises(ValueError, match=arg):
        short_conv(torch.randn(2, 6, 2, 4), args.pop("weight"), **args)
