"""`kvshift train --init-from`: a pretrained checkpoint in, every trainable mode, the control arm, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvshift.cli import main
from kvshift.data.shards import prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
FAST = ["--set", "steps=4", "--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "eval_every=2",
        "--set", "ckpt_every=2", "--set", "tensorboard=false", "--set", "progress=false", "--set",
        "optim.warmup_steps=1", "--set", "data.val_tokens=512"]


def _corpus(folder, seed: int, words=WORDS):
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(24):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A prepared corpus and a tiny Llama (GQA, tied embeddings) saved with that corpus' tokenizer."""
    root = tmp_path_factory.mktemp("retrofit")
    prepare(str(_corpus(root / "corpus", 0)), root / "data", vocab_size=300, val_fraction=0.2)
    tok = AutoTokenizer.from_pretrained(root / "data")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root


def _train(pretrained, out, *extra) -> int:
    return main(["train", "--init-from", str(pretrained / "llama"), "--data", str(pretrained / "data"), *FAST,
                 *extra, "--out", str(out)])


def _weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_identity_start_computes_the_source_model(pretrained):
    from kvshift.train.recipes import get_recipe
    from kvshift.train.retrofit import init_from_checkpoint, load_start_model

    src = LlamaForCausalLM.from_pretrained(pretrained / "llama").eval()
    ids = torch.randint(0, src.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    for kv_shift in (True, False):
        cfg = init_from_checkpoint(get_recipe("tiny"), str(pretrained / "llama"))
        cfg.model.kv_shift = kv_shift
        model, _ = load_start_model(cfg)
        assert any("k_shift" in n for n, _ in model.named_parameters()) == kv_shift
        with torch.no_grad():
            assert (model.eval()(ids).logits - src(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["all", "shift", "lora", "shift-current"])
def test_every_trainable_mode_trains_what_it_says(pretrained, tmp_path, capsys, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    assert _train(pretrained, tmp_path / "run", "--set", f"optim.trainable={mode}", "--set", "optim.lr=3e-2") == 0
    err = capsys.readouterr().err
    src = _weights(pretrained / "llama")
    final = tmp_path / "run" / "final"
    out = _weights(final)
    shift = {k: v for k, v in out.items() if k.endswith(("k_shift", "v_shift"))}
    assert len(shift) == 4 and all(v.dtype == torch.float32 for v in shift.values())
    n_shift = sum(v.numel() for v in shift.values())
    # every shift weight started at identity (1, 0); the current-token weights moved in every mode
    assert all((v[:, 0] != 1.0).any() for v in shift.values())
    same = [k for k in src if torch.equal(src[k], out[k])]
    if mode in ("shift", "shift-current"):
        assert same == sorted(src) or set(same) == set(src)  # every non-shift weight untouched
        n = n_shift // 2 if mode == "shift-current" else n_shift
        assert f"trainable parameters: {n:,} of" in err
        optim = torch.load(tmp_path / "run" / "checkpoints" / "step_0000004" / "optimizer.pt", weights_only=True)
        states = optim["optimizer"]["state"]
        assert len(states) == 4  # optimizer state for the 4 shift tensors only
    if mode == "shift-current":  # the control never uses the previous token
        assert all(torch.equal(v[:, 1], torch.zeros_like(v[:, 1])) for v in shift.values())
    else:
        assert any((v[:, 1] != 0).any() for v in shift.values())
    if mode in ("all", "lora"):
        changed = [k for k in src if k.endswith("q_proj.weight") and not torch.equal(src[k], out[k])]
        assert changed, "the projections did not train"
    if mode == "lora":
        assert not any("lora" in k for k in out)  # saved merged
        assert "trainable parameters:" in err and f"of {sum(v.numel() for v in src.values()) + n_shift:,}" in err
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert type(loaded).__name__ == "KVShiftForCausalLM"
    assert AutoTokenizer.from_pretrained(final)("alpha beta").input_ids == \
        AutoTokenizer.from_pretrained(pretrained / "llama")("alpha beta").input_ids


def test_control_arm_trains_the_same_parameters_on_the_same_data(pretrained, tmp_path):
    """Identity KV arm and vanilla arm: the same model at step 0, the same batches, so the same first loss;
    the vanilla arm has exactly the parameters of the KV arm less the shift."""
    assert _train(pretrained, tmp_path / "kv", "--set", "log_every=1") == 0
    assert _train(pretrained, tmp_path / "vanilla", "--set", "model.kv_shift=false", "--set", "log_every=1") == 0
    rows = {arm: [json.loads(line) for line in (tmp_path / arm / "metrics.jsonl").read_text().splitlines()]
            for arm in ("kv", "vanilla")}
    first = {arm: next(r for r in rs if "loss" in r) for arm, rs in rows.items()}
    assert first["kv"]["step"] == first["vanilla"]["step"] == 1
    assert abs(first["kv"]["loss"] - first["vanilla"]["loss"]) <= 1e-5
    kv, van = _weights(tmp_path / "kv" / "final"), _weights(tmp_path / "vanilla" / "final")
    assert set(kv) - set(van) == {f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("k_shift", "v_shift")}
    assert set(van) <= set(kv)


def test_resume_is_bit_exact(pretrained, tmp_path):
    assert _train(pretrained, tmp_path / "straight", "--set", "optim.trainable=shift") == 0
    assert _train(pretrained, tmp_path / "stopped", "--set", "optim.trainable=shift", "--set", "stop_after=2") == 0
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "stopped" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kvshift_folder_keeps_its_shift_weights(pretrained, tmp_path):
    """--init-from a kvshift model keeps its learned shift; an explicit init replaces it (with a warning)."""
    assert _train(pretrained, tmp_path / "first", "--set", "optim.lr=3e-2") == 0
    first = tmp_path / "first" / "final"
    from kvshift.train.recipes import get_recipe
    from kvshift.train.retrofit import init_from_checkpoint, load_start_model

    learned = _weights(first)["model.layers.0.self_attn.k_shift"]
    model, _ = load_start_model(init_from_checkpoint(get_recipe("tiny"), str(first)))
    assert torch.equal(model.model.layers[0].self_attn.k_shift.detach(), learned)
    cfg = init_from_checkpoint(get_recipe("tiny"), str(first))
    cfg.model.kv_shift_init = "near-identity"
    model, _ = load_start_model(cfg)
    assert torch.equal(model.model.layers[0].self_attn.k_shift.detach(), torch.tensor([[0.9, 0.1]] * 2))


def test_paper_init_on_a_pretrained_checkpoint_warns_in_one_line(pretrained, tmp_path, capsys):
    assert _train(pretrained, tmp_path / "run", "--set", "model.kv_shift_init=paper") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "no longer computes what the pretrained checkpoint computed" in lines[0]


def _refused(capsys, out, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvshift train: error:"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists()


def test_bad_input_is_refused_in_one_line_writing_nothing(pretrained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    data = ["--data", str(pretrained / "data")]
    _refused(capsys, out, ["train", "--init-from", str(tmp_path / "nope"), *data, "--out", str(out)],
             "--init-from", "no such file or directory")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    _refused(capsys, out, ["train", "--init-from", str(tmp_path / "gpt2"), *data, "--out", str(out)],
             "cannot convert architecture", "LlamaForCausalLM")
    # data tokenized with another tokenizer (a BPE trained on other text)
    prepare(str(_corpus(tmp_path / "other", 1, words=[w.upper() for w in WORDS])), tmp_path / "other-data",
            vocab_size=300, val_fraction=0.2)
    capsys.readouterr()
    _refused(capsys, out, ["train", "--init-from", str(pretrained / "llama"), "--data", str(tmp_path / "other-data"),
                           "--out", str(out)], "tokenizer mismatch", str(tmp_path / "other-data"),
             str(pretrained / "llama"))
    _refused(capsys, out, ["train", "--init-from", str(pretrained / "llama"), *data, "--set", "model.hidden_size=64",
                           "--out", str(out)], "model.hidden_size=64", "hidden_size=32")
    _refused(capsys, out, ["train", "--init-from", str(pretrained / "llama"), *data, "--set", "model.kv_shift=false",
                           "--set", "optim.trainable=shift", "--out", str(out)], "optim.trainable=shift",
             "nothing would train")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    _refused(capsys, out, ["train", "--init-from", str(pretrained / "llama"), *data, "--set", "optim.trainable=lora",
                           "--out", str(out)], "optim.trainable=lora", "peft")


@pytest.mark.parametrize("mode", ["shift", pytest.param("all", marks=pytest.mark.slow)])
def test_two_processes_match_one_under_ddp_and_fsdp(pretrained, tmp_path, mode):
    """torchrun with 2 processes (same global batch) gives the single process's final weights, DDP and FSDP2."""
    import subprocess
    import sys

    from safetensors.torch import load_file as load

    def run(strategy: str, nproc: int, batch: int) -> dict:
        out = tmp_path / f"{strategy}-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29100 + nproc * 10 + len(strategy) + len(mode)), "-m", "kvshift", "train", "--init-from",
               str(pretrained / "llama"), "--data", str(pretrained / "data"), *FAST, "--set",
               f"distributed.strategy={strategy}", "--set", f"data.batch_size={batch}", "--set",
               f"optim.trainable={mode}", "--set", "threads=1", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load(str(out / "final" / "model.safetensors"))

    single = run("none", 1, 4)
    for strategy in ("ddp", "fsdp"):
        double = run(strategy, 2, 2)
        # (a wrapped model's state dict names the tied lm_head too; it is the embedding)
        assert set(single) <= set(double) and set(double) - set(single) <= {"lm_head.weight"}
        assert max(float((single[k] - double[k]).abs().max()) for k in single) <= 1e-5, strategy


def test_per_layer_shift_of_a_kvshift_checkpoint_is_kept(tmp_path):
    from builders import tiny_model

    from kvshift.train.recipes import get_recipe
    from kvshift.train.retrofit import init_from_checkpoint, load_start_model

    src = tiny_model(seed=0, kv_shift=[True, False])
    src.save_pretrained(tmp_path / "kv")
    model, _ = load_start_model(init_from_checkpoint(get_recipe("tiny"), str(tmp_path / "kv")))
    assert model.config.kv_shift == [True, False]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert (model.eval()(ids).logits - src.eval()(ids).logits).abs().max() <= 1e-6
