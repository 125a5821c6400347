"""The attention layer owns "which parameters are shift weights"; RoPE defaults to the plain rotation."""

from __future__ import annotations

import torch
from builders import tiny_config, tiny_model

from kvshift.layers.attention import KVShiftAttention, is_shift_parameter
from kvshift.layers.rope import RotaryEmbedding
from kvshift.ops.rope import rope_cos_sin, rope_inv_freq
from kvshift.train.config import OptimConfig
from kvshift.train.optim import param_groups


def test_shift_parameters_are_the_ones_every_rule_names():
    m = tiny_model(kv_shift=[True, False])
    owned = {id(p) for layer in m.model.layers for p in layer.self_attn.shift_parameters()}
    named = {id(p) for n, p in m.named_parameters() if is_shift_parameter(n)}
    assert owned == named and len(owned) == 2  # layer 0 only: k_shift and v_shift
    assert m.model.layers[1].self_attn.shift_parameters() == []
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(m, OptimConfig())}
    assert groups["kv_shift"] == owned


def test_layer_alone_has_drawn_shift_weights():
    torch.manual_seed(0)
    attn = KVShiftAttention(tiny_config(), 0)
    k, v = attn.shift_weights()
    assert torch.allclose(k.sum(-1), torch.ones(k.shape[0])) and not torch.equal(k, v)


def test_default_rope_is_the_plain_rotation():
    c = tiny_config()
    rope = RotaryEmbedding(c)
    pos = torch.arange(9)[None]
    x = torch.zeros(1, 9, 4)
    cos, sin = rope(x, pos)
    ref = rope_cos_sin(pos, rope_inv_freq(c.head_dim, c.rope_theta), torch.float32)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
