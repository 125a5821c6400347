"""The lab's token-mixing variants (K / V / QKV, windows, per channel, Canon-B-like, Primer-like, smear):
one model definition, exact cached decoding in every mode, the paired initialisation, the boundary rule."""

from __future__ import annotations

import pytest
import torch
from builders import left_pad, tiny_config, tiny_model
from transformers import DynamicCache

from kvshift import KVShiftConfig, KVShiftForCausalLM
from kvshift.layers.attention import init_conv_weight, init_shift_weight, is_shift_parameter, shift_generator
from kvshift.models.cache import last_rows
from kvshift.models.configuration import TOKEN_MIXING_VARIANTS
from kvshift.train.config import OptimConfig
from kvshift.train.optim import param_groups

TOL = 1e-4
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
MIXERS = [n for n in TOKEN_MIXING_VARIANTS if n != "vanilla"]


def variant_model(name: str, seed: int = 0, **overrides) -> KVShiftForCausalLM:
    """A tiny model of variant ``name`` with every mixing weight random (off the convex line, negative
    ones too): identity-like weights would hide a wrong predecessor."""
    m = tiny_model(seed=seed, randomize_shift=False, **{**TOKEN_MIXING_VARIANTS[name], **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if is_shift_parameter(pname):
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 + (0.5 if pname.endswith("lambda") else 0.0))
    return m


def full_logits(m, ids, **kw):
    with torch.no_grad():
        return m(ids, use_cache=False, **kw).logits


def test_every_variant_has_its_weights():
    shapes = {}
    for name in TOKEN_MIXING_VARIANTS:
        m = tiny_model(randomize_shift=False, **TOKEN_MIXING_VARIANTS[name])
        shapes[name] = {n.split("layers.0.self_attn.")[-1]: tuple(p.shape) for n, p in m.named_parameters()
                        if is_shift_parameter(n) and "layers.1." not in n}
    H, Hkv, D = 4, 2, 8
    assert shapes["vanilla"] == {}
    assert shapes["kv"] == {"k_shift": (Hkv, 2), "v_shift": (Hkv, 2)}
    assert shapes["k"] == {"k_shift": (Hkv, 2)} and shapes["v"] == {"v_shift": (Hkv, 2)}
    assert shapes["qkv"] == {"q_shift": (H, 2), "k_shift": (Hkv, 2), "v_shift": (Hkv, 2)}
    assert shapes["kv-w3"] == {"k_shift": (Hkv, 3), "v_shift": (Hkv, 3)}
    assert shapes["kv-channel"] == {"k_shift": (Hkv, D, 2), "v_shift": (Hkv, D, 2)}
    assert shapes["canon-b"] == {"q_shift": (H, D, 4), "k_shift": (Hkv, D, 4), "v_shift": (Hkv, D, 4)}
    assert shapes["primer"] == {"q_shift": (H, D, 3), "k_shift": (Hkv, D, 3), "v_shift": (Hkv, D, 3)}
    assert shapes["smear"] == {"model.smear.smear_gate": (24,), "model.smear.smear_lambda": ()}


@pytest.mark.parametrize("name", MIXERS)
def test_variants_change_the_output(name):
    """Each mixer does something: the same shared weights without it give other logits."""
    ids = torch.randint(3, 97, (2, 10))
    assert (full_logits(variant_model(name), ids) - full_logits(tiny_model(randomize_shift=False, kv_shift=False),
                                                               ids)).abs().max() > 1e-3


@pytest.mark.parametrize("name", MIXERS)
def test_variants_are_causal(name):
    m = variant_model(name)
    ids = torch.randint(3, 97, (1, 10))
    base = full_logits(m, ids)
    for t in (2, 6):
        changed = ids.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 5) % 94 + 3
        assert (full_logits(m, changed)[:, : t + 1] - base[:, : t + 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("chunks", [(12,), (7, 1, 1, 1, 1, 1), (3, 4, 5), (1,) * 12])
def test_cached_decoding_equals_full_forward(name, chunks):
    m = variant_model(name)
    ids = torch.randint(3, 97, (2, 12))
    full = full_logits(m, ids)
    cache, outs, t = DynamicCache(config=m.config), [], 0
    with torch.no_grad():
        for c in chunks:
            outs.append(m(ids[:, t:t + c], cache=cache, use_cache=True).logits)
            t += c
    assert (torch.cat(outs, 1) - full).abs().max() <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_left_padded_batch_equals_unpadded(name):
    """Rows shorter than the window included: their missing predecessors are zeros, not padding."""
    m = variant_model(name)
    lens = (9, 1, 2, 5)
    T = max(lens) + 4
    seqs = [torch.randint(3, 97, (n + 4,)) for n in lens]
    ids, mask = left_pad(seqs, pad=7)  # a real token id: its projections are not zero
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        pre = m(ids[:, :-4], attention_mask=mask[:, :-4], cache=cache, use_cache=True).logits
        steps = [m(ids[:, j:j + 1], attention_mask=mask[:, : j + 1], cache=cache, use_cache=True).logits
                 for j in range(T - 4, T)]
    got = torch.cat([pre, *steps], 1)
    for i, s in enumerate(seqs):
        ref = full_logits(m, s[None])[0]
        assert (got[i, T - len(s):] - ref).abs().max() <= TOL, (name, i)


@pytest.mark.parametrize("name", MIXERS)
def test_generate_greedy_and_beams_equal_recompute(name):
    m = variant_model(name)
    ids = torch.randint(3, 97, (2, 5))
    cached = m.generate(ids, max_new_tokens=8, **GREEDY)
    ref = m.generate(ids, max_new_tokens=8, use_cache=False, **GREEDY)
    assert torch.equal(cached, ref)
    kw = dict(num_beams=3, num_return_sequences=3, output_scores=True, return_dict_in_generate=True,
              max_new_tokens=8, **GREEDY)
    b, rb = m.generate(ids, **kw), m.generate(ids, use_cache=False, **kw)
    assert torch.equal(b.sequences, rb.sequences)
    assert (b.sequences_scores - rb.sequences_scores).abs().max() <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_assisted_decoding_equals_greedy(name):
    m = variant_model(name)
    assistant = variant_model(name, seed=3)  # a different model: some candidates are rejected
    ids = torch.randint(3, 97, (1, 6))
    ref = m.generate(ids, max_new_tokens=12, use_cache=False, **GREEDY)
    assert torch.equal(m.generate(ids, max_new_tokens=12, assistant_model=assistant, **GREEDY), ref)
    assert torch.equal(m.generate(ids, max_new_tokens=12, prompt_lookup_num_tokens=3, **GREEDY), ref)


@pytest.mark.parametrize("name", MIXERS)
def test_speculative_rollback_restores_every_row(name):
    m = variant_model(name)
    ids = torch.randint(3, 97, (1, 12))
    full = full_logits(m, ids)
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids[:, :6], cache=cache, use_cache=True)
        cache.activate_past_recording()
        m(torch.cat([ids[:, 6:8], torch.randint(3, 97, (1, 3))], dim=1), cache=cache, use_cache=True)
        cache.crop(-3)
        out = m(ids[:, 8:], cache=cache, use_cache=True).logits
    assert (out - full[:, 8:]).abs().max() <= TOL


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_equals_separate(name, how, mode, use_cache):
    m = variant_model(name).train(mode == "train")
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g) for n in (5, 1, 2, 6)]
    if how == "position_ids":
        kw = {"position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    else:
        lens = torch.tensor([0] + [len(d) for d in docs])
        kw = {"cu_seqlens": lens.cumsum(0).to(torch.int32)}
    with torch.no_grad():
        out = m(torch.cat(docs)[None], use_cache=use_cache, **kw).logits[0]
        ref = torch.cat([m(d[None], use_cache=use_cache).logits[0] for d in docs])
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_mha_and_gqa(name):
    for kv_heads in (4, 2, 1):
        m = variant_model(name, num_key_value_heads=kv_heads)
        ids = torch.randint(3, 97, (2, 9))
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            a = m(ids[:, :5], cache=cache, use_cache=True).logits
            b = m(ids[:, 5:], cache=cache, use_cache=True).logits
        assert (torch.cat([a, b], 1) - full_logits(m, ids)).abs().max() <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_paired_initialisation_shares_every_other_weight(name):
    torch.manual_seed(11)
    vanilla = KVShiftForCausalLM(tiny_config(kv_shift=False))
    torch.manual_seed(11)
    variant = KVShiftForCausalLM(tiny_config(**TOKEN_MIXING_VARIANTS[name]))
    shared = dict(vanilla.named_parameters())
    mine = {n: p for n, p in variant.named_parameters() if not is_shift_parameter(n)}
    assert mine.keys() == shared.keys()
    assert all(torch.equal(p, shared[n]) for n, p in mine.items())
    assert any(is_shift_parameter(n) for n, _ in variant.named_parameters())


def test_k_only_and_kv_draw_the_same_key_weights():
    torch.manual_seed(0)
    kv = KVShiftForCausalLM(tiny_config())
    torch.manual_seed(0)
    k = KVShiftForCausalLM(tiny_config(kv_shift_targets="k"))
    torch.manual_seed(0)
    qkv = KVShiftForCausalLM(tiny_config(kv_shift_targets="qkv"))
    for i in range(2):
        a, b, c = (x.model.layers[i].self_attn for x in (kv, k, qkv))
        assert torch.equal(a.k_shift, b.k_shift) and torch.equal(a.k_shift, c.k_shift)
        assert torch.equal(a.v_shift, c.v_shift)


@pytest.mark.parametrize("shape", [(3, 3), (3, 4), (2, 5, 2), (2, 5, 4)])
def test_paper_init_follows_the_papers_wider_window_rule(shape):
    """Paper §4.7: the first w - 1 taps ~ U(0, 1), the oldest 1 - their sum."""
    w = init_conv_weight(shape, "paper", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w.sum(-1), torch.ones(shape[:-1]))
    assert (w[..., :-1] >= 0).all() and (w[..., :-1] <= 1).all() and w.std() > 0.05
    big = init_conv_weight((4000, shape[-1]), "paper", generator=torch.Generator().manual_seed(1))
    assert (big[:, :-1].mean(0) - 0.5).abs().max() < 0.03  # uniform taps
    if shape[-1] > 2:
        assert (big[:, -1] < 0).any()  # the oldest tap can start negative, as in the paper
    gate = torch.softmax(init_conv_weight(shape, "paper", "gate", generator=torch.Generator().manual_seed(0)), -1)
    assert (gate > 0).all() and torch.allclose(gate.sum(-1), torch.ones(shape[:-1]))
    ident = init_conv_weight(shape, "identity")
    assert torch.equal(ident[..., 0], torch.ones(shape[:-1])) and not ident[..., 1:].any()
    assert not init_conv_weight(shape, "identity", residual=True).any()
    r = init_conv_weight(shape, "paper", residual=True, generator=torch.Generator().manual_seed(0))
    assert r.abs().max() <= shape[-1] ** -0.5 and (r < 0).any()


def test_window_2_per_head_init_is_the_papers():
    for mode in ("paper", "identity", "softmax"):
        for par in ("free", "gate", "clamp"):
            a = init_conv_weight((3, 2), mode, par, generator=torch.Generator().manual_seed(5))
            b = init_shift_weight(3, mode, par, generator=torch.Generator().manual_seed(5))
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["kv-w3", "kv-channel-w4"])
def test_identity_init_is_vanilla(name):
    ids = torch.randint(3, 97, (2, 8))
    torch.manual_seed(0)
    a = KVShiftForCausalLM(tiny_config(kv_shift=False)).eval()
    torch.manual_seed(0)
    b = KVShiftForCausalLM(tiny_config(kv_shift_init="identity", **TOKEN_MIXING_VARIANTS[name])).eval()
    assert (full_logits(a, ids) - full_logits(b, ids)).abs().max() <= 1e-5


def test_gate_with_a_wider_window_is_a_softmax():
    m = tiny_model(randomize_shift=False, kv_shift_window=3, kv_shift_parametrization="gate")
    attn = m.model.layers[0].self_attn
    w = attn.mix_weights()["k"]
    assert torch.allclose(w.sum(-1), torch.ones(2)) and (w > 0).all()
    with torch.no_grad():
        attn.k_shift.fill_(5.0)
    assert torch.allclose(attn.mix_weights()["k"], torch.full((2, 3), 1 / 3))


def test_the_general_path_at_window_2_equals_the_papers_kernel():
    """The short-convolution path (forced on) computes exactly what the fused kv_shift path does."""
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 10))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]] * 2)
    ref = full_logits(m, ids, position_ids=pos)
    for layer in m.model.layers:
        layer.self_attn.paper_form = False
    assert (full_logits(m, ids, position_ids=pos) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["qkv", "kv-w3", "canon-b", "smear"])
def test_mixing_weights_learn_in_their_own_group(name):
    m = variant_model(name).train()
    ids = torch.randint(3, 97, (2, 10))
    m(ids, labels=ids).loss.backward()
    mixing = [(n, p) for n, p in m.named_parameters() if is_shift_parameter(n)]
    assert mixing and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in mixing)
    groups = {g["name"]: g["params"] for g in param_groups(m, OptimConfig())}
    assert {id(p) for _, p in mixing} == {id(p) for p in groups["kv_shift"]}


def test_last_rows_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        B, T, n = 3, int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        x = torch.randn(B, T, 2, generator=g)
        old = torch.randn(B, n, 2, generator=g) if trial % 2 else None
        pad = (torch.rand(B, T, generator=g) > 0.3).long() if trial % 3 else None
        reset = (torch.rand(B, T, generator=g) > 0.7) if trial % 4 > 1 else None
        got = last_rows(old, x, n, pad, reset)
        for b in range(B):
            rows = [r for r in (old[b] if old is not None else torch.zeros(n, 2))]
            for t in range(T):
                if reset is not None and bool(reset[b, t]):
                    rows = []
                if pad is None or bool(pad[b, t]):
                    rows.append(x[b, t])
            want = ([torch.zeros(2)] * n + rows)[-n:]
            assert torch.equal(got[b], torch.stack(want)), trial


def test_config_rejects_bad_variant_fields():
    for kw, word in [({"kv_shift_targets": "qk"}, "kv_shift_targets"), ({"kv_shift_window": 1}, "kv_shift_window"),
                     ({"kv_shift_window": 9}, "kv_shift_window"), ({"kv_shift_granularity": "dim"},
                                                                    "kv_shift_granularity")]:
        with pytest.raises(ValueError, match=word):
            KVShiftConfig(**kw)
    with pytest.raises((ValueError, TypeError), match="token_smear"):
        KVShiftConfig(token_smear="yes")


def test_variant_round_trips_through_save_pretrained(tmp_path):
    m = variant_model("canon-b")
    m.save_pretrained(tmp_path)
    back = KVShiftForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.kv_shift_window == 4 and back.config.kv_shift_residual
    ids = torch.randint(3, 97, (1, 7))
    assert torch.equal(full_logits(m, ids), full_logits(back, ids))


def test_shift_generator_untouched():
    """The variants draw their weights from the peeked per-layer generator, like the paper's shift."""
    state = torch.random.get_rng_state()
    shift_generator(0)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("name", ["kv", "qkv", "k", "kv-w3", "primer", "canon-b"])
def test_attention_maps_of_the_analysis_equal_the_models(name):
    from kvshift.eval.heads import attention_maps

    m = variant_model(name)
    m.config._attn_implementation = "eager"
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        want = m(ids, use_cache=False, output_attentions=True).attentions
    got = attention_maps(m, ids)
    assert len(got) == len(want) and all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))


@pytest.mark.parametrize("name", MIXERS)
def test_static_cache_and_sampling_equal_recompute(name):
    m = variant_model(name)
    seqs = [torch.randint(3, 97, (n,)) for n in (7, 2)]
    ids, mask = left_pad(seqs, pad=9)
    kw = dict(attention_mask=mask, max_new_tokens=6, **GREEDY)
    ref = m.generate(ids, use_cache=False, **kw)
    assert torch.equal(m.generate(ids, cache_implementation="static", **kw), ref)
    assert torch.equal(m.generate(ids, **kw), ref)
    sample = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(4)
    a = m.generate(ids, **sample)
    torch.manual_seed(4)
    assert torch.equal(a, m.generate(ids, use_cache=False, **sample))


def test_a_general_mixer_compiles_fullgraph_and_matches_eager():
    """Training a variant under torch.compile(fullgraph=True): packed rows, values and gradients as in eager."""
    m = variant_model("canon-b", token_smear=True).train()
    ids = torch.randint(3, 97, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]] * 2)

    def loss(model):
        return model(ids, position_ids=pos, labels=ids, use_cache=False).loss

    eager = loss(m)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if is_shift_parameter(n)}
    m.zero_grad()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(m)
    compiled.backward()
    assert (compiled - eager).abs() <= 1e-5
    for n, g in grads.items():
        assert torch.allclose(dict(m.named_parameters())[n].grad, g, atol=1e-5), n


@pytest.mark.parametrize("name", ["qkv", "kv-w3", "canon-b"])
@pytest.mark.parametrize("extra", [{"kv_shift_position": "post_rope"}, {"qk_norm": True},
                                   {"kv_shift_position": "post_rope", "qk_norm": True}],
                         ids=["post_rope", "qk_norm", "post_rope+qk_norm"])
def test_positions_and_qk_norm_decode_exactly(name, extra):
    m = variant_model(name, **extra)
    ids = torch.randint(3, 97, (2, 10))
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        outs = [m(ids[:, :4], cache=cache, use_cache=True).logits]
        outs += [m(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 10)]
    assert (torch.cat(outs, 1) - full_logits(m, ids)).abs().max() <= TOL


@pytest.mark.parametrize("shape", [(3, 2), (2, 5, 2), (2, 5, 3)])
@pytest.mark.parametrize("mode", ["paper", "identity", "softmax"])
def test_gate_init_starts_convex_and_identity_is_the_current_token(shape, mode):
    m = tiny_model(randomize_shift=False, kv_shift_parametrization="gate", kv_shift_init=mode,
                   kv_shift_window=shape[-1], kv_shift_granularity="channel" if len(shape) == 3 else "head")
    w = m.model.layers[0].self_attn.mix_weights()["k"]
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6) and (w >= 0).all()
    if mode == "identity":
        assert torch.allclose(w[..., 0], torch.ones(w.shape[:-1]), atol=1e-6)
    else:
        assert w[..., 0].std() > 0.02


@pytest.mark.parametrize("name,rows", [("kv", None), ("kv-w3", 2), ("canon-b", 3), ("primer", 2), ("smear", None)])
def test_the_decode_state_grows_only_where_needed(name, rows):
    m = variant_model(name)
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(torch.randint(3, 97, (3, 9)), cache=cache, use_cache=True)
    layer = cache.layers[1]
    if name == "kv":
        assert layer.shift_k.shape == (3, 1, 2, 8) and not layer.conv_state
    elif name == "smear":
        assert not hasattr(layer, "conv_state") or not layer.conv_state
        assert cache.layers[0].conv_state["smear"].shape == (3, 1, 32)
    else:
        assert layer.shift_k is None
        targets = TOKEN_MIXING_VARIANTS[name].get("kv_shift_targets", "kv")
        assert set(layer.conv_state) == set(targets)
        assert layer.conv_state["k"].shape == (3, rows, 2, 8)
        if "q" in targets:
            assert layer.conv_state["q"].shape == (3, rows, 4, 8)


@pytest.mark.parametrize("name", ["kv-w3", "smear"])
def test_rollback_without_recording_is_refused(name):
    m = variant_model(name)
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(torch.randint(3, 97, (1, 6)), cache=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="roll back"):
        cache.crop(-2)
