"""`kvshift convert`: Llama / Qwen2 / Mistral checkpoints become KV-shifting models equal to the source (identity init)."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_auto import make_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvshift import KVShiftForCausalLM
from kvshift.cli import main
from kvshift.models.convert import convert_checkpoint

BASE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SOURCES = {
    "llama_mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama_gqa_tied_bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                                attention_bias=True, mlp_bias=True)),
    "qwen2_mha": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=4)),
    "qwen2_gqa": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, rope_theta=1e6)),
    "mistral_mha": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=4, sliding_window=None)),
    "mistral_gqa_window": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=1, sliding_window=5,
                                                                   head_dim=16)),
    # Qwen2's max_window_layers: layer 0 full, layer 1 sliding over 5 tokens (shorter than the 13-token inputs)
    "qwen2_mixed_window": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, use_sliding_window=True,
                                                               sliding_window=5, max_window_layers=1)),
}


def build_source(name: str, seed: int = 0):
    """A tiny randomly initialised source model; biases made non-zero so that a dropped bias would show."""
    config_cls, model_cls, extra = SOURCES[name]
    extra = dict(extra)
    rope_theta = extra.pop("rope_theta", None)
    config = config_cls(**BASE, **extra)
    if rope_theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def all_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


IDS = torch.randint(3, 320, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(SOURCES))
def test_identity_conversion_equals_source(name):
    src = build_source(name)
    model = convert_checkpoint(src)
    assert type(model) is KVShiftForCausalLM and not model.training
    c = model.config
    assert c.kv_shift_init == "identity" and c.qkv_bias == name.startswith("qwen2")
    assert c.rope_theta == src.config.rope_parameters["rope_theta"]
    assert c.sliding_window == getattr(src.config, "sliding_window", None)
    if name == "qwen2_mixed_window":
        assert src.config.layer_types == c.layer_types == ["full_attention", "sliding_attention"]
    assert (all_logits(model, IDS) - all_logits(src, IDS)).abs().max() <= 1e-5
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(IDS, **kw), src.generate(IDS, **kw))
    # the source's weights were copied, not shared
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
    assert src.model.embed_tokens.weight.abs().sum() > 0


def test_identity_conversion_left_padded_batch():
    src = build_source("llama_gqa_tied_bias")
    model = convert_checkpoint(src)
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0
    real = mask.bool()
    diff = (all_logits(model, IDS, mask) - all_logits(src, IDS, mask))[real]
    assert diff.abs().max() <= 1e-5
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(IDS, **kw), src.generate(IDS, **kw))


def test_paper_init_changes_the_model_and_is_seeded():
    src = build_source("qwen2_gqa")
    model = convert_checkpoint(src, init="paper", seed=3)
    assert model.config.kv_shift_init == "paper"
    assert (all_logits(model, IDS) - all_logits(src, IDS)).abs().max() > 1e-3
    for k_w, v_w in model.kv_shift_weights().values():
        for w in (k_w, v_w):
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[0])) and (w >= 0).all()
    again = convert_checkpoint(src, init="paper", seed=3)
    assert torch.equal(all_logits(again, IDS), all_logits(model, IDS))


@pytest.mark.parametrize("name", ["llama_gqa_tied_bias", "qwen2_gqa", "mistral_gqa_window"])
def test_saved_conversion_loads_with_auto_classes(tmp_path, name):
    src = build_source(name)
    convert_checkpoint(src, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded) is KVShiftForCausalLM
    assert (all_logits(loaded, IDS) - all_logits(src, IDS)).abs().max() <= 1e-5
    assert loaded.generation_config.eos_token_id == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_cli_convert_from_a_saved_checkpoint(tmp_path, capsys):
    src = build_source("mistral_gqa_window")
    src.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    out = tmp_path / "kv"
    assert main(["convert", "--from", str(tmp_path / "src"), "--to", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "kvshift" and cfg["sliding_window"] == 5 and cfg["head_dim"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (all_logits(loaded, IDS) - all_logits(src, IDS)).abs().max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat sat").input_ids == make_tokenizer()("the cat sat").input_ids
    # an existing output directory is never overwritten silently
    assert main(["convert", "--from", str(tmp_path / "src"), "--to", str(out), "--init", "paper"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["kv_shift_init"] == "identity"
    assert main(["convert", "--from", str(tmp_path / "src"), "--to", str(out), "--init", "paper",
                 "--overwrite", "--dtype", "bfloat16"]) == 0
    assert "warning: kv_shift_init='paper' replaces the identity shift" in capsys.readouterr().err
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.config.kv_shift_init == "paper"
    # every weight in bf16 but the shift scalars, which stay fp32 (a bf16 1.0 cannot take a 1e-4 step)
    assert {n: p.dtype for n, p in again.named_parameters() if p.dtype != torch.bfloat16} == {
        n: torch.float32 for n, _ in again.named_parameters() if n.endswith(("k_shift", "v_shift"))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv", "src"]


def _no_leftovers(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if name in p.name]


def test_unsupported_architecture(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    msg = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM"
    with pytest.raises(ValueError, match=msg):
        convert_checkpoint(gpt2, tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert main(["convert", "--from", str(tmp_path / "gpt2"), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and msg in err
    _no_leftovers(tmp_path, "out")
    # a Llama checkpoint whose head is not a causal LM is not supported either
    from transformers import LlamaForSequenceClassification

    cls = LlamaForSequenceClassification(LlamaConfig(**BASE, num_key_value_heads=4))
    with pytest.raises(ValueError, match=msg):
        convert_checkpoint(cls)


def test_bad_inputs_leave_no_output(tmp_path, capsys, monkeypatch):
    # not a model directory
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--from", str(tmp_path / "empty"), "--to", str(tmp_path / "out")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    _no_leftovers(tmp_path, "out")
    # an unsupported RoPE variant (partial rotation)
    src = build_source("llama_mha")
    src.config.partial_rotary_factor = 0.5
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        convert_checkpoint(src, tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    # a tokenizer larger than the model's vocabulary
    small = LlamaForCausalLM(LlamaConfig(**{**BASE, "vocab_size": 97}, num_key_value_heads=4))
    small.save_pretrained(tmp_path / "small")
    make_tokenizer().save_pretrained(tmp_path / "small")  # 300 tokens > 97
    with pytest.raises(ValueError, match=r"300 tokens.*vocab_size is 97"):
        convert_checkpoint(str(tmp_path / "small"), tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    # a failure while writing removes the partial output
    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(KVShiftForCausalLM, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(build_source("qwen2_mha"), tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    with pytest.raises(ValueError, match="init must be one of"):
        convert_checkpoint(build_source("qwen2_mha"), init="zeros")
