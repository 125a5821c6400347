"""vLLM serving: greedy tokens from vLLM's engine equal Hugging Face ``generate`` exactly, under continuous
batching, chunked prefill, preemption and prefix caching, for MHA and GQA checkpoints with the shift on, partly on and off;
``vllm serve`` answers OpenAI completions; unsupported checkpoints are refused naming the field.

Runs in the serving env only (``bash scripts/setup.sh --serve --test``; vLLM pins an older transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is more than tests need
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from builders import tiny_model  # noqa: E402

from kvshift.data.tokenizer import byte_tokenizer  # noqa: E402
from kvshift.serving.offline import hf_greedy, mixed_prompts, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm

NEW = 16
# head_dim 32: the smallest head size vLLM's CPU attention has kernels for
CASES = {
    "mha": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2),
    "gqa-gate-qknorm-layer0": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, qk_norm=True,
                                   qkv_bias=True, kv_shift_parametrization="gate", kv_shift=[True, False]),
    "shift-off": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, kv_shift=False),
    # the lab's variants that are the same convolution with another width or weight layout
    "w3-channel-residual": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, kv_shift_window=3,
                                kv_shift_granularity="channel", kv_shift_residual=True),
    "w4-gate": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, kv_shift_window=4,
                    kv_shift_parametrization="gate"),
}


def _save(path: Path, **overrides) -> Path:
    """A tiny byte-vocabulary checkpoint with random weights and random (off-convex) shift weights, saved
    as ``kvshift train`` saves ``final/``: the model and its tokenizer."""
    fields = dict(vocab_size=257, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=96,
                  initializer_range=0.1, pad_token_id=256, bos_token_id=None, eos_token_id=256)
    model = tiny_model(seed=0, **{**fields, **overrides})
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = _save(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    prompts = mixed_prompts(32, (1, 45))
    reference, _ = hf_greedy(str(path), prompts, NEW)
    return request.param, str(path), prompts, reference


def _mismatches(got, want) -> list[int]:
    assert len(got) == len(want)
    return [i for i, (a, b) in enumerate(zip(got, want)) if a != b]


def test_shift_changes_the_reference(tmp_path):
    """The comparison can fail: the same weights with the shift made the identity decode other tokens."""
    path = _save(tmp_path / "ck", **CASES["mha"])
    prompts = mixed_prompts(32, (1, 45))
    shifted, _ = hf_greedy(str(path), prompts, NEW)
    from kvshift.models import KVShiftForCausalLM

    model = KVShiftForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_shift.copy_(torch.tensor([1.0, 0.0]).expand_as(layer.self_attn.k_shift))
            layer.self_attn.v_shift.copy_(torch.tensor([1.0, 0.0]).expand_as(layer.self_attn.v_shift))
    plain, _ = hf_greedy(str(path), prompts, NEW, model=model)
    assert len(_mismatches(plain, shifted)) >= 24


def test_continuous_batching_matches_hf(case):
    name, path, prompts, reference = case
    tokens, stats = vllm_greedy(path, prompts, NEW, max_num_seqs=8)
    assert stats["max_running"] == 8  # requests really shared the engine's batches
    assert _mismatches(tokens, reference) == []


def test_chunked_prefill_matches_hf(case):
    name, path, prompts, reference = case
    if name == "shift-off":
        pytest.skip("no shift state to carry across chunks")
    assert max(len(p) for p in prompts) > 2 * 16  # some prompts are prefilled in three chunks or more
    tokens, stats = vllm_greedy(path, prompts, NEW, enable_chunked_prefill=True, max_num_batched_tokens=16,
                                max_num_seqs=8)
    assert _mismatches(tokens, reference) == []


def test_preemption_matches_hf(tmp_path):
    """Too few KV blocks for every request: vLLM preempts running requests and recomputes them later,
    so their shift state must start again from zero at the recomputed prefill."""
    path = str(_save(tmp_path / "ck", **CASES["mha"]))
    prompts = mixed_prompts(32, (1, 20), seed=1)
    reference, _ = hf_greedy(path, prompts, 40)
    tokens, stats = vllm_greedy(path, prompts, 40, num_gpu_blocks_override=8, block_size=16)
    assert stats["preemptions"] > 0
    assert _mismatches(tokens, reference) == []


def test_prefix_caching_matches_hf(tmp_path):
    """Prompts sharing a 65-70-token prefix, one at a time: later ones start from cached blocks, and from
    the shift state vLLM saved at that block boundary ('align' mode)."""
    path = str(_save(tmp_path / "ck", **CASES["gqa-gate-qknorm-layer0"]))
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(1, 256, (70,), generator=g).tolist()
    prompts = [shared[:70 - i] + torch.randint(1, 256, (1 + i % 5,), generator=g).tolist() for i in range(12)]
    reference, _ = hf_greedy(path, prompts, 8)
    tokens, stats = vllm_greedy(path, prompts, 8, enable_prefix_caching=True, block_size=16, max_num_seqs=1)
    assert stats["prefix_cached_tokens"] >= 4 * 64  # later prompts started from cached 16-token blocks
    assert _mismatches(tokens, reference) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_answers_openai_completions(tmp_path):
    path = _save(tmp_path / "final", **CASES["gqa-gate-qknorm-layer0"])
    vllm_bin = Path(sys.executable).parent / "vllm"
    exe = str(vllm_bin) if vllm_bin.exists() else shutil.which("vllm")
    assert exe, "the vllm command is not installed beside this Python"
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([exe, "serve", str(path), "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
                             "--enforce-eager", "--max-model-len", "96"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "vllm serve did not become healthy in 300 s"
            time.sleep(1)
        models = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=30).read())
        assert [m["id"] for m in models["data"]] == [str(path)]
        tok = byte_tokenizer()
        from kvshift.models import KVShiftForCausalLM

        model = KVShiftForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        for text in ["Hello, KV shifting!", "a", "def f(x):\n    return"]:
            out = _post(f"{base}/v1/completions", {"model": str(path), "prompt": text, "max_tokens": 12,
                                                   "temperature": 0, "return_token_ids": True})
            ids = tok(text, add_special_tokens=False)["input_ids"]
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
            choice = out["choices"][0]
            assert choice["prompt_token_ids"] == ids
            assert choice["token_ids"] == gen  # greedy tokens equal HF generate's (EOS included when it stops)
            assert out["usage"]["completion_tokens"] == len(gen)
            # the text is the decoded tokens; vLLM holds back an unfinished UTF-8 sequence at the very end
            full = tok.decode([t for t in gen if t != 256])
            assert full.startswith(choice["text"]) and len(full) - len(choice["text"]) <= 3
            assert choice["finish_reason"] == ("stop" if 256 in gen else "length")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.parametrize("field,value", [("kv_shift_window", 5), ("kv_shift_position", "post_rope"),
                                         ("kv_shift_targets", "k"), ("kv_shift_targets", "qkv"),
                                         ("token_smear", True)])
def test_unservable_configs_are_refused_naming_the_field(field, value):
    from kvshift.models import KVShiftConfig
    from kvshift.serving.vllm_model import check_servable

    check_servable(KVShiftConfig())  # the default config serves, and so do the convolution variants
    check_servable(KVShiftConfig(kv_shift_window=4, kv_shift_granularity="channel", kv_shift_residual=True))
    with pytest.raises(ValueError, match=field):
        check_servable(KVShiftConfig(**{field: value}))
