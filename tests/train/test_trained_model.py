"""A model the trainer saved is ready to use: inference defaults, a tokenizer that pads, docs/huggingface.md's
Load/Generate snippets run on it as written, the static cache is really used, `kvshift generate` works."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

import kvshift  # noqa: F401
from kvshift.cli import main
from kvshift.data.bytes import ByteCorpus
from kvshift.data.shards import prepare
from kvshift.train.config import apply_overrides
from kvshift.train.loop import train
from kvshift.train.recipes import get_recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "huggingface.md"
SMALL = ["progress=false", "tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64",
         "data.seq_len=32", "data.batch_size=4", "data.byte_files=8", "steps=3", "eval_every=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """``final/`` of a tiny raw-byte run and of a run on a small prepared corpus (trained BPE)."""
    root = tmp_path_factory.mktemp("trained")
    byte_run = train(apply_overrides(get_recipe("tiny"), SMALL), root / "bytes")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"the cat sat on mat number {i}. hello world {i * 7}\n" * 20)
    prepare(str(corpus), root / "data", vocab_size=300, val_fraction=0.2)
    bpe_run = train(apply_overrides(get_recipe("tiny"), SMALL + ["data.source=prepared",
                                                                 f"data.path={root / 'data'}"]), root / "bpe")
    return {"bytes": Path(byte_run["final_dir"]), "bpe": Path(bpe_run["final_dir"])}


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_saved_model_has_inference_defaults_and_a_padding_tokenizer(trained, kind):
    final = trained[kind]
    config = json.loads((final / "config.json").read_text())
    gen = json.loads((final / "generation_config.json").read_text())
    assert config["use_cache"] is True and gen.get("use_cache", True) is True
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert config["eos_token_id"] == tok.eos_token_id == gen["pad_token_id"]
    assert config.get("pad_token_id") is None  # would be the embedding's padding_idx: no gradient for EOS
    assert config.get("bos_token_id") is None  # documents are separated by EOS; nothing is prepended
    assert tok("the cat").input_ids[0] != tok.eos_token_id


def test_byte_tokenizer_matches_the_byte_corpus(trained):
    tok = AutoTokenizer.from_pretrained(trained["bytes"])
    text = "def f(x):\n\treturn x  # héllo 日本\x00"
    corpus = ByteCorpus([text.encode()])
    assert tok(text).input_ids == corpus.tokens[:-1].tolist()
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == corpus.vocab_size and tok.eos_token_id == corpus.eos_id


def _snippet(title: str) -> str:
    text = DOC.read_text()
    section = text[re.search(rf"^#+ {re.escape(title)}$", text, flags=re.M).start():]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_docs_load_and_generate_snippets_run_on_a_trained_model(trained, kind, tmp_path, caplog):
    ns = {"MODEL_DIR": str(trained[kind]), "SAVE_DIR": str(tmp_path / "saved"), "__name__": "docs_snippet"}
    caplog.set_level(logging.WARNING)
    exec(compile(_snippet("Load and save"), str(DOC), "exec"), ns)
    exec(compile(_snippet("Generate"), str(DOC), "exec"), ns)
    assert ns["greedy"].shape[1] == ns["batch"].input_ids.shape[1] + 20
    assert not [r for r in caplog.records if "may be ignored" in r.getMessage()]


def test_static_cache_is_really_used(trained):
    model = AutoModelForCausalLM.from_pretrained(trained["bpe"]).eval()
    tok = AutoTokenizer.from_pretrained(trained["bpe"])
    tok.padding_side = "left"
    batch = tok(["the cat sat", "hello"], return_tensors="pt", padding=True)
    seen = []
    real = model._prepare_cache_for_generation

    def spy(generation_config, model_kwargs, *args, **kwargs):
        out = real(generation_config, model_kwargs, *args, **kwargs)
        seen.append(model_kwargs.get("cache"))
        return out

    model._prepare_cache_for_generation = spy
    static = model.generate(**batch, max_new_tokens=8, do_sample=False, cache_implementation="static")
    greedy = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert isinstance(seen[0], StaticCache) and not isinstance(seen[1], StaticCache)
    assert torch.equal(static, greedy)


def test_kvshift_generate_on_a_trained_model(trained, capsys):
    assert main(["generate", "--model", str(trained["bytes"]), "--prompt", "def f(", "--prompt", "import os",
                 "--max-new-tokens", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def f(", "import os"]


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(trained, capsys):
    long = "x" * 80  # 80 byte tokens > max_position_embeddings = 32
    assert main(["generate", "--model", str(trained["bytes"]), "--prompt", long, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "80 tokens" in err and "max_position_embeddings=32" in err and "--truncate" in err
    assert main(["generate", "--model", str(trained["bytes"]), "--prompt", long, "--max-new-tokens", "2",
                 "--truncate", "--json"]) == 0
    captured = capsys.readouterr()
    assert "kept the last 32 of 80" in captured.err and json.loads(captured.out)["prompt"] == long


def test_eos_embedding_is_trained(tmp_path):
    """EOS separates documents and is a target: its embedding row must be initialised and learn."""
    from kvshift.train.loop import build_model_for_data

    cfg = apply_overrides(get_recipe("tiny"), SMALL)
    model = build_model_for_data(cfg, 257, 256)
    emb = model.model.embed_tokens
    assert emb.padding_idx is None and emb.weight[256].abs().sum() > 0
    ids = torch.tensor([[5, 256, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert emb.weight.grad[256].abs().sum() > 0


def test_generate_on_a_run_or_checkpoint_folder_says_what_to_use(tmp_path, capsys):
    run = tmp_path / "run"
    train(apply_overrides(get_recipe("tiny"), SMALL + ["steps=4", "ckpt_every=2", "stop_after=2"]), run)
    step = run / "checkpoints" / "step_0000002"
    assert main(["generate", "--model", str(step), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "training checkpoint" in err and str(run / "final") in err
    assert main(["generate", "--model", str(run), "--prompt", "x"]) == 2
    assert "without a final model yet" in capsys.readouterr().err
    train(apply_overrides(get_recipe("tiny"), SMALL + ["steps=4", "ckpt_every=2"]), run, resume=run)
    assert main(["generate", "--model", str(run), "--prompt", "x"]) == 2
    assert f"its model is {run / 'final'}" in capsys.readouterr().err
    assert main(["generate", "--model", str(run / "final"), "--prompt", "x", "--max-new-tokens", "2"]) == 0
