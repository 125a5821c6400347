"""KVShiftForCausalLM: parameter names, equivalence with Llama, packing, config validation."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from kvshift import KVShiftConfig, KVShiftForCausalLM


def llama_twin(model: KVShiftForCausalLM) -> LlamaForCausalLM:
    c = model.config
    lc = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
    )
    llama = LlamaForCausalLM(lc).eval()
    missing, unexpected = llama.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "_shift" not in k}, strict=False
    )
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return llama


def test_parameter_names_follow_llama():
    m = tiny_model(num_hidden_layers=2)
    names = set(dict(m.named_parameters()))
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{p}.weight" in names
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{p}.weight" in names
        assert f"model.layers.{i}.input_layernorm.weight" in names
        assert f"model.layers.{i}.post_attention_layernorm.weight" in names
        assert m.get_parameter(f"model.layers.{i}.self_attn.k_shift").shape == (2, 2)
        assert m.get_parameter(f"model.layers.{i}.self_attn.v_shift").shape == (2, 2)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_extra_parameter_count_is_4_layers_kv_heads():
    on = tiny_model(num_hidden_layers=3, num_key_value_heads=2)
    off = tiny_model(num_hidden_layers=3, num_key_value_heads=2, kv_shift=False)
    assert on.num_parameters() - off.num_parameters() == 4 * 3 * 2


def test_paper_init_is_complementary_and_independent():
    torch.manual_seed(0)
    m = KVShiftForCausalLM(tiny_config(num_hidden_layers=2, num_key_value_heads=4, num_attention_heads=4))
    for layer in m.model.layers:
        for w in (layer.self_attn.k_shift, layer.self_attn.v_shift):
            assert torch.allclose(w.sum(-1), torch.ones(4))
            assert ((w >= 0) & (w <= 1)).all()
        assert not torch.equal(layer.self_attn.k_shift, layer.self_attn.v_shift)


def test_identity_init():
    m = KVShiftForCausalLM(tiny_config(kv_shift_init="identity"))
    for layer in m.model.layers:
        assert torch.equal(layer.self_attn.k_shift, torch.tensor([[1.0, 0.0]] * 2))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("variant", ["no_shift", "identity"])
def test_equals_llama(kv_heads, variant):
    kw = dict(num_key_value_heads=kv_heads)
    if variant == "no_shift":
        m = tiny_model(kv_shift=False, **kw)
    else:
        m = tiny_model(randomize_shift=False, kv_shift_init="identity", **kw)
    llama = llama_twin(m)
    x = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        diff = (m(x).logits - llama(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_shift_changes_the_model():
    m = tiny_model()
    llama = llama_twin(m)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (m(x).logits - llama(x).logits).abs().max() > 1e-3


def test_shift_is_causal():
    m = tiny_model()
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 7:] = torch.randint(0, 97, (5,))
    with torch.no_grad():
        assert torch.allclose(m(x).logits[:, :7], m(y).logits[:, :7], atol=1e-6)


def _docs(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g) for n in lens]


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
def test_packed_equals_separate(how):
    m = tiny_model()
    docs = _docs([5, 1, 7, 3])
    packed = torch.cat(docs)[None]
    kwargs = {}
    if how == "position_ids":
        kwargs["position_ids"] = torch.cat([torch.arange(len(d)) for d in docs])[None]
    else:
        lens = torch.tensor([len(d) for d in docs])
        kwargs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    with torch.no_grad():
        out = m(packed, **kwargs).logits[0]
        ref = torch.cat([m(d[None]).logits[0] for d in docs])
    assert (out - ref).abs().max() <= 1e-5


def test_packed_with_2d_mask_does_not_attend_across_documents():
    m = tiny_model()
    docs = _docs([4, 6])
    packed = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    with torch.no_grad():
        out = m(packed, position_ids=pos, attention_mask=torch.ones(1, 10, dtype=torch.long)).logits[0]
        ref = torch.cat([m(d[None]).logits[0] for d in docs])
    assert (out - ref).abs().max() <= 1e-5


def test_left_padding_equals_unpadded():
    m = tiny_model()
    a, b = _docs([7, 4])
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a, b
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = m(ids, attention_mask=mask, position_ids=pos).logits
        assert (out[0] - m(a[None]).logits[0]).abs().max() <= 1e-5
        assert (out[1, 3:] - m(b[None]).logits[0]).abs().max() <= 1e-5


def test_loss_and_backward_reach_shift_weights():
    m = tiny_model().train()
    x = torch.randint(0, 97, (2, 8))
    out = m(x, labels=x)
    out.loss.backward()
    g = m.model.layers[0].self_attn.k_shift.grad
    assert g is not None and g.abs().sum() > 0


def test_per_layer_selection():
    m = tiny_model(num_hidden_layers=3, kv_shift=[True, False, True])
    assert [layer.self_attn.use_kv_shift for layer in m.model.layers] == [True, False, True]
    assert not hasattr(m.model.layers[1].self_attn, "k_shift")


@pytest.mark.parametrize("param", ["gate", "clamp"])
def test_constrained_parametrizations(param):
    m = tiny_model(kv_shift_parametrization=param, randomize_shift=True)
    kw, vw = m.model.layers[0].self_attn.shift_weights()
    assert ((kw >= 0) & (kw <= 1)).all() and ((vw >= 0) & (vw <= 1)).all()
    if param == "gate":
        assert torch.allclose(kw.sum(-1), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(kv_shift_init="uniform"), "kv_shift_init"),
        (dict(kv_shift=[True]), "kv_shift"),
        (dict(kv_shift_position="middle"), "kv_shift_position"),
    ],
)
def test_bad_config(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        tiny_config(**kwargs)


def test_config_roundtrip(tmp_path):
    c = tiny_config(kv_shift=[True, False], kv_shift_init="identity", kv_shift_position="post_rope")
    c.save_pretrained(tmp_path)
    c2 = KVShiftConfig.from_pretrained(tmp_path)
    assert c2.kv_shift == [True, False] and c2.kv_shift_init == "identity"
    assert c2.kv_shift_position == "post_rope" and c2.rope_theta == c.rope_theta
