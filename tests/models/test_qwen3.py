"""Qwen3 (per-head q/k RMSNorm) converts exactly; with a shift, the k-norm acts on the shifted key."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from kvshift import KVShiftForCausalLM
from kvshift.models.convert import convert_checkpoint
from kvshift.ops.kv_shift import kv_shift_ref
from kvshift.ops.rope import apply_rope

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def _qwen3():
    torch.manual_seed(0)
    src = Qwen3ForCausalLM(Qwen3Config(**BASE)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a dropped or misplaced norm would show
        for layer in src.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return src


def test_identity_conversion_equals_qwen3(tmp_path):
    src = _qwen3()
    convert_checkpoint(src, tmp_path / "kv", init="identity")
    model = KVShiftForCausalLM.from_pretrained(tmp_path / "kv").eval()
    assert model.config.qk_norm and model.config.head_dim == 16
    ids = torch.randint(3, 101, (2, 12))
    with torch.no_grad():
        assert (model(ids).logits - src(ids).logits).abs().max() <= 1e-5
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), src.generate(prompt, **kw))


@pytest.mark.parametrize("chunks", [(12,), (5, 1, 6)])
def test_shifted_key_is_normalised_then_rotated(tmp_path, chunks):
    src = _qwen3()
    convert_checkpoint(src, tmp_path / "kv", init="paper")
    model = KVShiftForCausalLM.from_pretrained(tmp_path / "kv").eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 12, 32)
    T = x.shape[1]
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        k = attn.k_proj(x).view(1, T, 2, 16)
        kw, _ = attn.shift_weights()
        expected = apply_rope(attn.k_norm(kv_shift_ref(k, kw)), cos, sin).transpose(1, 2)
        got = attn._shift_kv(k, attn.v_proj(x).view(1, T, 2, 16), cos, sin, None, None, None)[0]
    assert (got - expected).abs().max() <= 1e-5
    # and cached decoding with the norm stays exact
    ids = torch.randint(3, 101, (1, sum(chunks)))
    with torch.no_grad():
        full = model(ids).logits
        from transformers import DynamicCache

        cache, outs, start = DynamicCache(config=model.config), [], 0
        for n in chunks:
            outs.append(model(ids[:, start:start + n], past_key_values=cache, use_cache=True).logits)
            start += n
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-4
