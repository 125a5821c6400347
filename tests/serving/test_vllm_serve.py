"""``vllm serve`` on 127.0.0.1 with a kvshift checkpoint: OpenAI completions equal Hugging Face ``generate``;
a bounded load (64 concurrent requests of mixed lengths, greedy and sampled) is answered in full with HF's
greedy tokens; bad requests get a 4xx and change nothing.

Runs in the serving env only (``bash scripts/setup.sh --serve --test``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from builders import tiny_model  # noqa: E402

from kvshift.data.tokenizer import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm

CONTEXT = 96
EOS = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body, timeout: float = 300) -> tuple[int, dict]:
    """(status, JSON answer) of a POST; ``body`` as bytes is sent as is (malformed JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, path: Path, proc: subprocess.Popen, base: str, log: Path) -> None:
        self.path, self.proc, self.base, self.log = path, proc, base, log
        self.tok = byte_tokenizer()
        from kvshift.models import KVShiftForCausalLM

        self.model = KVShiftForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def complete(self, prompt, max_tokens: int, **extra) -> tuple[int, dict]:
        body = {"model": str(self.path), "prompt": prompt, "max_tokens": max_tokens, "return_token_ids": True, **extra}
        return _post(f"{self.base}/v1/completions", body)

    def hf_greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
        return out[0, len(ids):].tolist()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``vllm serve`` of a tiny GQA checkpoint (gate parametrisation, QK-norm, QKV bias, shift in layer 0)."""
    root = tmp_path_factory.mktemp("serve")
    path = root / "final"
    fields = dict(vocab_size=257, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=CONTEXT,
                  initializer_range=0.1, pad_token_id=EOS, bos_token_id=None, eos_token_id=EOS, hidden_size=128,
                  num_attention_heads=4, num_key_value_heads=2, qk_norm=True, qkv_bias=True,
                  kv_shift_parametrization="gate", kv_shift=[True, False])
    tiny_model(seed=0, **fields).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    vllm_bin = Path(sys.executable).parent / "vllm"
    exe = str(vllm_bin) if vllm_bin.exists() else shutil.which("vllm")
    assert exe, "the vllm command is not installed beside this Python"
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log_path = root / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([exe, "serve", str(path), "--port", str(port), "--host", "127.0.0.1", "--dtype",
                             "float32", "--enforce-eager", "--max-model-len", str(CONTEXT), "--max-num-seqs", "16"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(path, proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.time() + 300
        while not srv.healthy():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "vllm serve did not become healthy in 300 s"
            time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_vllm_serve_answers_openai_completions(server):
    models = json.loads(urllib.request.urlopen(f"{server.base}/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == [str(server.path)]
    for text in ["Hello, KV shifting!", "a", "def f(x):\n    return"]:
        status, out = server.complete(text, 12, temperature=0)
        assert status == 200
        ids = server.tok(text, add_special_tokens=False)["input_ids"]
        gen = server.hf_greedy(ids, 12)
        choice = out["choices"][0]
        assert choice["prompt_token_ids"] == ids
        assert choice["token_ids"] == gen  # greedy tokens equal HF generate's (EOS included when it stops)
        assert out["usage"]["completion_tokens"] == len(gen)
        # the text is the decoded tokens; vLLM holds back an unfinished UTF-8 sequence at the very end
        full = server.tok.decode([t for t in gen if t != EOS])
        assert full.startswith(choice["text"]) and len(full) - len(choice["text"]) <= 3
        assert choice["finish_reason"] == ("stop" if EOS in gen else "length")


def _load_requests(n: int = 64, seed: int = 0) -> list[dict]:
    """Mixed requests: prompts of 1-60 printable characters, 1-30 new tokens, three in four greedy and the
    rest sampled (temperature 0.8, own seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz (){}:=+-_.,\n0123456789") for _ in range(rng.randint(1, 60)))
        greedy = i % 4 != 3
        out.append({"prompt": text, "max_tokens": rng.randint(1, 30),
                    "extra": {"temperature": 0} if greedy else {"temperature": 0.8, "seed": i}})
    return out


def test_64_concurrent_requests_are_all_answered_with_hf_tokens(server):
    requests = _load_requests()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = list(pool.map(lambda r: server.complete(r["prompt"], r["max_tokens"], **r["extra"]), requests))
    seconds = time.perf_counter() - t0
    assert [status for status, _ in answers] == [200] * len(requests)
    greedy_checked = 0
    for req, (_, out) in zip(requests, answers):
        choice = out["choices"][0]
        ids = server.tok(req["prompt"], add_special_tokens=False)["input_ids"]
        assert choice["prompt_token_ids"] == ids
        n = len(choice["token_ids"])
        assert 1 <= n <= req["max_tokens"] and (n == req["max_tokens"] or choice["token_ids"][-1] == EOS)
        if req["extra"]["temperature"] == 0:
            assert choice["token_ids"] == server.hf_greedy(ids, req["max_tokens"])
            greedy_checked += 1
    assert greedy_checked == 48
    assert server.healthy() and server.proc.poll() is None
    print(f"64 concurrent requests answered in {seconds:.1f} s")


@pytest.mark.parametrize("case", ["max_tokens=0", "max_tokens=-1", "prompt past the context", "unknown model",
                                  "out-of-vocabulary token id", "empty prompt", "malformed JSON"])
def test_bad_requests_get_a_4xx_and_change_nothing(server, case):
    url = f"{server.base}/v1/completions"
    good = {"model": str(server.path), "prompt": "KV shift", "max_tokens": 8, "temperature": 0,
            "return_token_ids": True}
    status, before = _post(url, good)
    assert status == 200
    bad = {
        "max_tokens=0": {**good, "max_tokens": 0},
        "max_tokens=-1": {**good, "max_tokens": -1},
        "prompt past the context": {**good, "prompt": "x" * (CONTEXT + 10)},
        "unknown model": {**good, "model": "no-such-model"},
        "out-of-vocabulary token id": {**good, "prompt": [1, 2, 100_000]},
        "empty prompt": {**good, "prompt": ""},
        "malformed JSON": b'{"model": "x", "prompt": ',
    }[case]
    status, answer = _post(url, bad)
    assert 400 <= status < 500, (status, answer)
    assert "error" in answer or "detail" in answer or "message" in answer
    assert server.healthy() and server.proc.poll() is None
    status, after = _post(url, good)
    assert status == 200 and after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
