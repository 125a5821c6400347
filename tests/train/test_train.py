"""Trainer: overrides, recipes, checkpoint/resume exactness, atomic checkpoints, divergence, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvshift.train import checkpoint as ckpt_mod
from kvshift.train.config import TrainConfig, apply_overrides
from kvshift.train.loop import TrainingDiverged, train
from kvshift.train.optim import build_optimizer, lr_factor, param_groups
from kvshift.train.recipes import get_recipe


def tiny(**sets) -> TrainConfig:
    cfg = get_recipe("tiny")
    cfg.progress, cfg.tensorboard = False, False
    cfg.model.hidden_size, cfg.model.intermediate_size = 32, 64
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.byte_files = 32, 4, 8
    cfg.steps, cfg.eval_every = 6, 3
    return apply_overrides(cfg, [f"{k}={v}" for k, v in sets.items()])


def test_overrides_parse_types_and_reject_unknown():
    cfg = apply_overrides(get_recipe("tiny"), ["optim.lr=0.01", "model.kv_shift=false", "steps=7"])
    assert cfg.optim.lr == 0.01 and cfg.model.kv_shift is False and cfg.steps == 7
    with pytest.raises(ValueError, match="optim.nope"):
        apply_overrides(get_recipe("tiny"), ["optim.nope=1"])
    with pytest.raises(ValueError, match="steps"):
        apply_overrides(get_recipe("tiny"), ["steps=abc"])
    with pytest.raises(ValueError, match="kv_shift"):
        apply_overrides(get_recipe("tiny"), ["model.kv_shift=maybe"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(get_recipe("tiny"), ["steps"])
    with pytest.raises(ValueError, match="optim.schedule"):
        apply_overrides(get_recipe("tiny"), ["optim.schedule=linear"])
    with pytest.raises(ValueError, match="optim.implementation"):
        apply_overrides(get_recipe("tiny"), ["optim.implementation=turbo"])
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("huge")


@pytest.mark.parametrize("implementation", ["auto", "loop"])
def test_optimizer_implementation_does_not_change_the_update(implementation):
    """The default (fused) AdamW takes the same step as PyTorch's reference for-loop AdamW."""
    from kvshift.train.loop import build_model_for_data

    cfg = tiny()
    steps = {}
    for impl in ("loop", implementation):
        torch.manual_seed(0)
        model = build_model_for_data(cfg, 257, 256)
        cfg.optim.implementation = impl
        opt = build_optimizer(model, cfg.optim)
        x = torch.randint(0, 257, (2, 16))
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        steps[impl] = (opt, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert steps[implementation][0].defaults["fused"] is (True if implementation == "auto" else None)
    torch.testing.assert_close(steps[implementation][1], steps["loop"][1], atol=1e-6, rtol=1e-5)


def test_schedules():
    cfg = get_recipe("tiny").optim
    cfg.warmup_steps, cfg.min_lr_ratio = 10, 0.1
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    cfg.schedule, cfg.decay_frac = "wsd", 0.2
    assert lr_factor(50, 100, cfg) == 1.0 and lr_factor(99, 100, cfg) == pytest.approx(0.1)


def test_param_groups_exempt_norms_and_shift():
    from kvshift.train.loop import build_model_for_data

    cfg = tiny(**{"optim.shift_lr_mult": 10.0})
    model = build_model_for_data(cfg, 257, 256)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    shift_ids = {id(p) for n, p in model.named_parameters() if n.endswith("_shift")}
    assert {id(p) for p in groups["kv_shift"]["params"]} == shift_ids
    assert groups["kv_shift"]["weight_decay"] == 0 and groups["kv_shift"]["lr_mult"] == 10.0
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == cfg.optim.weight_decay
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])


def test_tiny_run_writes_everything(tmp_path):
    summary = train(tiny(), tmp_path / "run")
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "summary.json", "final/model.safetensors", "checkpoints/latest"):
        assert (run / f).exists(), f
    assert summary["final_loss"] < summary["losses"][0]
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r and "val_bpb" in r for r in recs)
    from kvshift import KVShiftForCausalLM

    m = KVShiftForCausalLM.from_pretrained(run / "final")
    assert m.model.layers[0].self_attn.k_shift.dtype == torch.float32


def test_resume_equals_uninterrupted(tmp_path):
    full = train(tiny(steps=8), tmp_path / "full")["losses"]
    first = train(tiny(steps=8, stop_after=3), tmp_path / "split")["losses"]
    second = train(tiny(steps=8), tmp_path / "split", resume=tmp_path / "split")["losses"]
    assert first + second == full  # bit-identical on CPU


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny(steps=2), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(steps=2), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").read_bytes() == before


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    train(tiny(steps=4, ckpt_every=2, stop_after=2), tmp_path / "run")
    real_replace = os.replace

    def boom(src, dst):
        if "step_0000004" in str(dst):
            raise OSError("simulated kill during checkpoint write")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        train(tiny(steps=4, ckpt_every=2), tmp_path / "run", resume=tmp_path / "run")
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    model_state, _, state, folder = ckpt_mod.load_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and folder.name == "step_0000002" and model_state


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(tiny(steps=2), tmp_path / "run")
    f = tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        train(tiny(steps=4), tmp_path / "run", resume=tmp_path / "run")


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    train(tiny(steps=4, stop_after=2), tmp_path / "run")
    from kvshift.train import loop

    real = loop._nll_sum

    def poisoned(model, batch, device, autocast):
        nll, n = real(model, batch, device, autocast)
        return nll * float("nan"), n

    monkeypatch.setattr(loop, "_nll_sum", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train(tiny(steps=4), tmp_path / "run", resume=tmp_path / "run")
    _, _, state, _ = ckpt_mod.load_checkpoint(tmp_path / "run")
    assert state["step"] == 2


def test_missing_data_is_a_clear_error(tmp_path):
    cfg = tiny(**{"data.source": "prepared", "data.path": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="data prepare"):
        train(cfg, tmp_path / "run")


def test_vocab_too_small_for_data(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny(**{"model.vocab_size": 100}), tmp_path / "run")


def test_cli_train_and_print_config(tmp_path):
    from kvshift.cli import main

    assert main(["train", "--recipe", "tiny", "--set", "steps=2", "--set", "progress=false",
                 "--set", "tensorboard=false", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "final" / "config.json").exists()
    assert main(["train", "--recipe", "tiny", "--set", "nope=1"]) == 2


def _run_bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a torchrun launch; past ``timeout`` kill its whole process group (the launcher *and* its workers,
    which a hung collective would otherwise leave behind) and fail the test saying so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[3:])} did not finish in {timeout} s (hung?); stderr tail:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(tmp_path: Path, strategy: str, nproc: int, batch: int, name: str) -> list[float]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + (hash(name) % 400)), "-m", "kvshift", "train", "--recipe", "tiny", "--out", str(out),
           "--set", f"distributed.strategy={strategy}", "--set", f"data.batch_size={batch}",
           "--set", "steps=4", "--set", "progress=false", "--set", "tensorboard=false",
           "--set", "model.hidden_size=32", "--set", "model.intermediate_size=64", "--set", "data.seq_len=32",
           "--set", "data.byte_files=8", "--set", "threads=1", "--set", "log_every=1"]
    proc = _run_bounded(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one summary (rank 0 only), not one per rank glued together
    assert summary["steps"] == 4
    assert proc.stderr.count("global batch 8 rows") == 1  # the global batch, stated once
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_matches_one_process(tmp_path, strategy):
    single = _torchrun(tmp_path, "none", 1, 8, f"single-{strategy}")
    double = _torchrun(tmp_path, strategy, 2, 4, f"double-{strategy}")
    assert len(single) == len(double) == 4
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-4  # same global batch, fp32 reduction order


def test_tiny_recipe_on_two_processes_finishes_under_ddp_and_fsdp(tmp_path):
    """The README's torchrun command, unchanged but for --out. Its validation split gives the two ranks
    different numbers of batches; FSDP gathers parameters in every forward, so without filler batches the
    rank with fewer waits for ever (it hung at step 10 of 20). Both strategies must finish and agree."""
    summaries = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29900 + len(strategy)), "-m", "kvshift", "train", "--recipe", "tiny",
               "--set", f"distributed.strategy={strategy}", "--out", str(out)]
        proc = _run_bounded(cmd, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[strategy] = json.loads(proc.stdout)
        assert summaries[strategy]["steps"] == 20 and (out / "final" / "model.safetensors").exists()
    ddp, fsdp = summaries["ddp"], summaries["fsdp"]
    assert ddp["val_tokens"] == fsdp["val_tokens"] > 0  # fillers score nothing: the same targets counted
    assert abs(ddp["val_loss"] - fsdp["val_loss"]) < 1e-5
    assert abs(ddp["final_loss"] - fsdp["final_loss"]) < 1e-5


def test_compare_tiny_writes_stats_and_plot(tmp_path):
    from kvshift.experiments.compare import compare

    sets = ["steps=3", "eval_every=3", "model.hidden_size=32", "model.intermediate_size=64", "data.seq_len=32",
            "data.batch_size=4", "data.byte_files=8", "tensorboard=false"]
    payload = compare("tiny", 2, tmp_path / "cmp", overrides=sets)
    for f in ("results.json", "results.md", "config.json", "val_loss.png"):
        assert (tmp_path / "cmp" / f).exists(), f
    assert payload["paired_val_loss"]["n"] == 2
    variants = {(r["model"], r["metric"]) for r in payload["rows"]}
    assert ("kvshift", "val_loss") in variants and ("vanilla", "val_loss") in variants
    assert len(payload["shift_tables"]) == 2
    # same seed, same data order: the two variants start from the same initial loss up to the shift
    v0, k0 = payload["runs"]["vanilla"][0], payload["runs"]["kvshift"][0]
    assert v0["tokens"] == k0["tokens"]


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    big = train(tiny(steps=3, **{"data.batch_size": 4}), tmp_path / "big")["losses"]
    acc = train(tiny(steps=3, **{"data.batch_size": 2, "data.grad_accum": 2}), tmp_path / "acc")["losses"]
    assert max(abs(a - b) for a, b in zip(big, acc)) < 1e-5
