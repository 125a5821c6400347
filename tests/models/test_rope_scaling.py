"""RoPE scaling through transformers' RoPE utilities: the model equals Llama with the same RoPE, and Llama 3
checkpoints convert exactly (identity shift: same logits, same greedy output)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvshift import KVShiftForCausalLM
from kvshift.models.convert import convert_checkpoint

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0, 3.0, 4.0, 5.0],
                 "original_max_position_embeddings": 16},
}


def _llama(rope, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(**BASE)
    config.rope_parameters = {"rope_theta": 50000.0, **rope}
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", sorted(ROPES))
def test_converted_scaled_rope_equals_llama(name, tmp_path):
    src = _llama(ROPES[name])
    convert_checkpoint(src, tmp_path / "kv", init="identity")
    model = KVShiftForCausalLM.from_pretrained(tmp_path / "kv").eval()
    assert model.config.rope_parameters["rope_type"] == name
    ids = torch.randint(3, 101, (2, 40))  # longer than max_position_embeddings: dynamic/longrope rescale
    with torch.no_grad():
        assert (model(ids).logits - src(ids).logits).abs().max() <= 1e-5
        short = ids[:, :10]
        assert (model(short).logits - src(short).logits).abs().max() <= 1e-5
    prompt = ids[:1, :6]
    kw = dict(max_new_tokens=30, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), src.generate(prompt, **kw))


def test_scaled_rope_changes_the_model_and_round_trips(tmp_path):
    from builders import tiny_config

    plain = KVShiftForCausalLM(tiny_config()).eval()
    torch.manual_seed(0)
    a = KVShiftForCausalLM(tiny_config())
    torch.manual_seed(0)
    b = KVShiftForCausalLM(tiny_config(rope_parameters={"rope_type": "linear", "factor": 4.0}))
    assert not torch.allclose(a.model.rotary_emb.inv_freq, b.model.rotary_emb.inv_freq)
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() > 1e-4
    b.save_pretrained(tmp_path)
    c = KVShiftForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(c(ids).logits, b.eval()(ids).logits)
    assert plain.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_legacy_rope_scaling_and_bad_parameters():
    from builders import tiny_config

    c = tiny_config(rope_scaling={"type": "linear", "factor": 2.0})
    assert c.rope_parameters["rope_type"] == "linear" and c.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match="rope_parameters"):
        tiny_config(rope_parameters={"rope_type": "linear"})  # no factor
