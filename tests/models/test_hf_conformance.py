"""Transformers conventions: attention backends (eager returns weights), output flags from the config,
config round-trips with extra attributes, assisted decoding and prompt lookup equal greedy."""

from __future__ import annotations

import logging

import pytest
import torch
from builders import tiny_config, tiny_model

from kvshift import KVShiftConfig, KVShiftForCausalLM, KVShiftModel

BACKENDS = ["eager", "sdpa", "flex_attention"]


def _with_backend(impl, **kw):
    m = tiny_model(**kw)
    m.set_attn_implementation(impl)
    assert m.config._attn_implementation == impl
    return m


def _padded_batch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 97, (9,), generator=g), torch.randint(3, 97, (5,), generator=g)
    left = torch.zeros(2, 9, dtype=torch.long)
    left[0], left[1, 4:] = a, b
    left_mask = (left != 0).long()
    right = torch.zeros(2, 9, dtype=torch.long)
    right[0], right[1, :5] = a, b
    return a, b, (left, left_mask), (right, (right != 0).long())


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_backends_match_eager_with_padding(impl, kv_heads):
    ref, other = _with_backend("eager", num_key_value_heads=kv_heads), _with_backend(impl, num_key_value_heads=kv_heads)
    a, b, (left, lm), (right, rm) = _padded_batch()
    with torch.no_grad():
        for ids, mask in ((left, lm), (right, rm), (left, None)):
            x, y = ref(ids, attention_mask=mask).logits, other(ids, attention_mask=mask).logits
            real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            assert (x - y)[real].abs().max() <= 1e-5, (impl, mask is None)


@pytest.mark.parametrize("impl", BACKENDS)
def test_padding_free_packed_equals_padded(impl):
    m = _with_backend(impl)
    a, b, (left, lm), _ = _padded_batch()
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
    with torch.no_grad():
        out = m(packed, position_ids=pos, use_cache=False).logits[0]
        pad = m(left, attention_mask=lm).logits
    assert (out[: len(a)] - pad[0]).abs().max() <= 1e-5
    assert (out[len(a):] - pad[1, 4:]).abs().max() <= 1e-5


def test_eager_returns_causal_attention_weights():
    m = _with_backend("eager", num_key_value_heads=2)
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        out = m(ids, output_attentions=True)
    assert len(out.attentions) == m.config.num_hidden_layers
    for w in out.attentions:
        assert w.shape == (2, m.config.num_attention_heads, 7, 7)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 7), atol=1e-5)
        assert w.triu(1).abs().max() == 0  # causal
    assert m(ids).attentions is None


def test_output_flags_and_return_dict_from_config():
    m = tiny_model()
    ids = torch.randint(3, 97, (1, 6))
    assert m(ids).hidden_states is None
    m.config.output_hidden_states = True
    hs = m(ids).hidden_states
    assert len(hs) == m.config.num_hidden_layers + 1 and hs[0].shape == (1, 6, m.config.hidden_size)
    base = KVShiftModel(tiny_config())
    assert isinstance(base(ids, return_dict=False), tuple)
    m.config.return_dict = False
    out = m(ids)
    assert isinstance(out, tuple) and out[0].shape == (1, 6, m.config.vocab_size)
    assert isinstance(m(ids, return_dict=True).logits, torch.Tensor)


def test_config_with_extra_attributes_round_trips(tmp_path, caplog):
    c = tiny_config()
    c.layer_norm_eps = 1e-5  # the test mixins set attributes like this one
    c.save_pretrained(tmp_path)
    c2 = KVShiftConfig.from_pretrained(tmp_path)
    assert c2.layer_norm_eps == 1e-5 and c2.kv_shift_init == c.kv_shift_init
    KVShiftForCausalLM(c).save_pretrained(tmp_path / "m")
    assert KVShiftForCausalLM.from_pretrained(tmp_path / "m").config.layer_norm_eps == 1e-5
    with caplog.at_level(logging.WARNING):
        tiny_config(kv_shift_intt="paper")  # a typo still gets a pointer to the real field
    assert "did you mean 'kv_shift_init'" in caplog.text


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_and_prompt_lookup_equal_greedy(mode, kv_heads):
    m = tiny_model(num_key_value_heads=kv_heads)
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(3, 97, (4,), generator=g)
    ids = torch.cat([motif, torch.randint(3, 97, (3,), generator=g), motif])[None]  # lookup has hits
    kw = {"assistant_model": tiny_model(seed=1, num_key_value_heads=kv_heads)} if mode == "assistant" \
        else {"prompt_lookup_num_tokens": 3}
    greedy = m.generate(ids, max_new_tokens=15, do_sample=False, return_dict_in_generate=True, output_scores=True)
    fast = m.generate(ids, max_new_tokens=15, do_sample=False, return_dict_in_generate=True, output_scores=True,
                      **kw)
    assert torch.equal(greedy.sequences, fast.sequences)
    for s1, s2 in zip(greedy.scores, fast.scores):
        assert torch.allclose(s1, s2, atol=1e-4)


def test_assisted_with_output_attentions_equals_greedy():
    m = _with_backend("eager", num_key_value_heads=2)
    a = _with_backend("eager", seed=1, num_key_value_heads=2)
    ids = torch.randint(3, 97, (1, 8))
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    greedy, fast = m.generate(ids, **kw), m.generate(ids, assistant_model=a, **kw)
    assert torch.equal(greedy.sequences, fast.sequences)
    assert fast.attentions is not None and fast.attentions[0][0].shape[-1] == ids.shape[1]


def test_eager_matches_sdpa_in_bfloat16_and_config_switch_to_flex():
    eager = _with_backend("eager").to(torch.bfloat16)
    sdpa = _with_backend("sdpa").to(torch.bfloat16)
    _, _, (left, lm), _ = _padded_batch()
    with torch.no_grad():
        a, b = eager(left, attention_mask=lm).logits.float(), sdpa(left, attention_mask=lm).logits.float()
    assert (a - b)[lm.bool()].abs().max() <= 1e-2  # transformers' bf16 tolerance for SDPA vs eager
    m = tiny_model()
    ids = left[:1, :]
    with torch.no_grad():
        ref = m(ids).logits
        m.config._attn_implementation = "flex_attention"  # set directly, as the test mixins do
        assert (m(ids).logits - ref).abs().max() <= 1e-5
