"""Hugging Face integration: Auto classes, safetensors save/load round trip, tokenizer beside the model, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from builders import tiny_config, tiny_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from kvshift import KVShiftConfig, KVShiftForCausalLM, KVShiftModel

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello world, hello kv shift",
         "induction heads copy the token that followed"]
VOCAB = 300  # tokenizer size; tiny models built for it use vocab_size >= this


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory on a few strings: <pad>=0, <s>=1, </s>=2 (as in tiny_config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(path, *, seed: int = 0, with_tokenizer: bool = True, **overrides) -> KVShiftForCausalLM:
    """Save a tiny random kvshift model (vocab 320) and, optionally, the tiny tokenizer into ``path``."""
    overrides.setdefault("vocab_size", 320)
    model = tiny_model(seed=seed, **overrides)
    model.save_pretrained(path)
    if with_tokenizer:
        make_tokenizer().save_pretrained(path)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_auto_classes_know_kvshift():
    assert AutoConfig.for_model("kvshift").__class__ is KVShiftConfig
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is KVShiftForCausalLM
    assert type(AutoModel.from_config(tiny_config())) is KVShiftModel


@pytest.mark.parametrize("variant", [
    {}, {"tie_word_embeddings": True}, {"qkv_bias": True, "num_key_value_heads": 4},
    {"num_hidden_layers": 3, "kv_shift": [True, False, True], "kv_shift_position": "post_rope"},
    {"sliding_window": 4},
], ids=["default", "tied", "qkv_bias_mha", "mixed_layers", "sliding"])
def test_save_load_roundtrip_identical_logits(tmp_path, variant):
    model = save_tiny(tmp_path, with_tokenizer=False, **variant)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "kvshift" and saved["architectures"] == ["KVShiftForCausalLM"]

    ids = torch.randint(3, 320, (2, 11))
    ref = logits(model, ids)
    for _ in range(2):  # every load must rebuild the same model (non-persistent buffers included)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(loaded) is KVShiftForCausalLM and not loaded.training
        assert torch.equal(logits(loaded, ids), ref)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if variant.get("tie_word_embeddings"):
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is KVShiftModel
    with torch.no_grad():
        hidden = base(ids, use_cache=False).last_hidden_state
    assert torch.equal(loaded.lm_head(hidden), ref)


def test_roundtrip_keeps_cached_generation(tmp_path):
    model = save_tiny(tmp_path, with_tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 320, (2, 5))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))


def test_load_in_bfloat16(tmp_path):
    model = save_tiny(tmp_path, with_tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    # every weight in bf16 but the shift scalars, kept fp32 (a bf16 weight of 1 cannot take a 1e-4 step)
    assert all(p.dtype == (torch.float32 if n.endswith(("k_shift", "v_shift")) else torch.bfloat16)
               for n, p in loaded.named_parameters())
    ids = torch.randint(3, 320, (1, 9))
    assert (logits(loaded, ids).float() - logits(model, ids)).abs().max() < 0.1


def test_tokenizer_saved_beside_model_loads_with_autotokenizer(tmp_path):
    tok = make_tokenizer()
    model = save_tiny(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) <= model.config.vocab_size
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    for text in TEXTS + ["unseen words: zebra 123!"]:
        ids = loaded(text).input_ids
        assert ids == tok(text).input_ids
        assert loaded.decode(ids) == text  # byte-level: lossless
    # tokenizer -> model -> tokenizer
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    enc = loaded(["the cat", "hello world, hello"], return_tensors="pt", padding=True, padding_side="left")
    out = lm.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=loaded.pad_token_id)
    assert out.shape == (2, enc.input_ids.shape[1] + 4)
    assert all(isinstance(s, str) for s in loaded.batch_decode(out, skip_special_tokens=True))


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    from kvshift.models.loading import check_model_dir

    with pytest.raises(ValueError, match="not a model directory"):
        check_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    tiny_config().save_pretrained(tmp_path)  # a config but no weights
    with pytest.raises(ValueError, match="no weights"):
        check_model_dir(tmp_path)


def test_config_with_unknown_fields_loads(tmp_path):
    # transformers' convention: a config.json with extra keys loads, the keys become attributes
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["not_a_field"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert AutoConfig.from_pretrained(tmp_path).not_a_field == 3
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.not_a_field == 3
    from kvshift.models.loading import check_model_dir

    check_model_dir(tmp_path)


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    save_tiny(tmp_path, vocab_size=97)  # tokenizer has 300 tokens
    from kvshift.models.loading import check_model_dir

    with pytest.raises(ValueError, match=r"300 tokens.*vocab_size is 97"):
        check_model_dir(tmp_path)
