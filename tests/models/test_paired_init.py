"""Under one seed the KV-shift model and the vanilla model share every shared weight, bit for bit."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_config

from kvshift import KVShiftForCausalLM

INITS = ["paper", "identity", "softmax"]


def _build(seed, **kw):
    torch.manual_seed(seed)
    return KVShiftForCausalLM(tiny_config(**kw))


def _shift(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(("k_shift", "v_shift"))}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_same_seed_same_shared_weights(init, kv_heads):
    kv = _build(3, kv_shift=True, kv_shift_init=init, num_key_value_heads=kv_heads)
    van = _build(3, kv_shift=False, kv_shift_init=init, num_key_value_heads=kv_heads)
    shared = dict(van.named_parameters())
    kv_params = dict(kv.named_parameters())
    assert set(kv_params) - set(shared) == set(_shift(kv))
    for name, p in shared.items():
        assert torch.equal(p, kv_params[name]), name
    # and the global RNG is left where the vanilla model leaves it: data order is paired too
    torch.manual_seed(3)
    KVShiftForCausalLM(tiny_config(kv_shift=True, kv_shift_init=init, num_key_value_heads=kv_heads))
    a = torch.rand(4)
    torch.manual_seed(3)
    KVShiftForCausalLM(tiny_config(kv_shift=False, num_key_value_heads=kv_heads))
    assert torch.equal(a, torch.rand(4))


@pytest.mark.parametrize("init", ["paper", "softmax"])
def test_shift_draws_follow_the_seed(init):
    a = _shift(_build(1, kv_shift_init=init))
    b = _shift(_build(1, kv_shift_init=init))
    c = _shift(_build(2, kv_shift_init=init))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # heads, layers and K vs V get their own draws
    ks = [v for n, v in a.items() if n.endswith("k_shift")]
    vs = [v for n, v in a.items() if n.endswith("v_shift")]
    assert not torch.equal(ks[0], vs[0]) and not torch.equal(ks[0], ks[1])
    assert len(set(ks[0][:, 0].tolist())) == ks[0].shape[0]


def test_partial_layers_stay_paired():
    kv = _build(5, kv_shift=[False, True])
    van = _build(5, kv_shift=False)
    kvp = dict(kv.named_parameters())
    for name, p in van.named_parameters():
        assert torch.equal(p, kvp[name]), name
