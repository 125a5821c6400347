"""Training as users live it: default checkpoints, Ctrl-C / SIGTERM / kill -9, resume edge cases, run folders,
the NaN stop, and saved models that generate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvshift.cli import main
from kvshift.train import checkpoint as ckpt_mod
from kvshift.train import loop
from kvshift.train.config import TrainConfig, apply_overrides
from kvshift.train.loop import TrainingInterrupted, train
from kvshift.train.recipes import RECIPES, get_recipe

SMALL = ["progress=false", "tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64",
         "data.seq_len=32", "data.batch_size=4", "data.byte_files=8", "threads=1", "log_every=1"]


def tiny(**sets) -> TrainConfig:
    return apply_overrides(get_recipe("tiny"), SMALL + [f"{k}={v}" for k, v in sets.items()])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def steps_on_disk(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in ckpt_mod.list_checkpoints(run)]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_checkpoints_during_the_run(name):
    cfg = get_recipe(name)
    assert 0 < cfg.ckpt_every < cfg.steps and cfg.keep_checkpoints >= 1


def test_periodic_checkpoints_keep_the_newest(tmp_path):
    train(tiny(steps=9, ckpt_every=2, keep_checkpoints=2, eval_every=9), tmp_path / "run")
    assert steps_on_disk(tmp_path / "run") == [8, 9]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000009"


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    full = train(tiny(steps=10, eval_every=10), tmp_path / "full")["losses"]
    real, sent = loop.lr_factor, []

    def signal_at_step_4(step, total, cfg):  # called once per parameter group: signal once
        if step == 4 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, total, cfg)

    monkeypatch.setattr(loop, "lr_factor", signal_at_step_4)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(steps=10, eval_every=10, ckpt_every=0), tmp_path / "run")
    monkeypatch.setattr(loop, "lr_factor", real)
    assert info.value.step == 5 and info.value.checkpoint.name == "step_0000005"
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    rest = train(tiny(steps=10, eval_every=10), tmp_path / "run", resume=tmp_path / "run")["losses"]
    assert rest == full[5:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))


def _cli(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvshift", "train", "--recipe", "tiny", "--out", str(tmp_path / "run"),
           *[a for s in SMALL for a in ("--set", s)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, proc, timeout=120):
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"condition not reached; rc={proc.poll()} stderr={proc.stderr.read()[-2000:]}")
        time.sleep(0.05)


def test_ctrl_c_of_the_command_saves_and_exits_130(tmp_path):
    proc = _cli(tmp_path, "--set", "steps=100000", "--set", "ckpt_every=0", "--set", "eval_every=100000")
    _wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists()
              and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    saved = steps_on_disk(tmp_path / "run")
    assert len(saved) == 1 and saved[0] >= 3
    assert max(losses(tmp_path / "run")) == saved[0]  # the checkpoint holds the last step logged


def test_kill_9_then_resume_continues_exactly(tmp_path):
    ref = train(tiny(steps=30, eval_every=30), tmp_path / "ref")["losses"]
    proc = _cli(tmp_path, "--set", "steps=30", "--set", "ckpt_every=4", "--set", "eval_every=30")
    _wait_for(lambda: len(steps_on_disk(tmp_path / "run")) >= 1 and max(losses(tmp_path / "run") or [0]) > 5, proc)
    proc.kill()  # SIGKILL: nothing runs on the way out
    proc.communicate()
    last = steps_on_disk(tmp_path / "run")[-1]
    assert last < 30
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))  # no repeated rows after the resume
    got = [r["loss"] for r in rows]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-6


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    first = train(tiny(steps=4), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = train(tiny(steps=4), run, resume=run)
    assert again["final_loss"] == first["final_loss"] and again["val_loss"] == first["val_loss"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final_loss"] == first["final_loss"] and summary["val_bpb"] == first["val_bpb"]
    assert main(["train", "--resume", str(run), "--set", "steps=6"]) == 0  # training longer goes on
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_resume_from_a_step_folder_continues_the_run(tmp_path):
    run = tmp_path / "run"
    train(tiny(steps=8, ckpt_every=2, keep_checkpoints=5, stop_after=6), run)
    step4 = run / "checkpoints" / "step_0000004"
    inside = sorted(p.name for p in step4.iterdir())
    assert ckpt_mod.run_dir_of(step4) == run and ckpt_mod.run_dir_of(run / "checkpoints") == run
    assert main(["train", "--resume", str(step4)]) == 0
    assert sorted(p.name for p in step4.iterdir()) == inside  # nothing written inside the checkpoint
    assert (run / "final" / "model.safetensors").exists()
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 9))
    step6 = run / "checkpoints" / "step_0000006"  # the library call, out == the checkpoint folder
    inside = sorted(p.name for p in step6.iterdir())
    train(tiny(steps=8, ckpt_every=2, keep_checkpoints=5), step6, resume=step6)
    assert sorted(p.name for p in step6.iterdir()) == inside


def test_corrupt_latest_falls_back_to_the_older_intact_one(tmp_path):
    run = tmp_path / "run"
    train(tiny(steps=6, ckpt_every=2, stop_after=4), run)
    latest = run / "checkpoints" / "step_0000004"
    (latest / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_0000004.*step_0000002"):
        _, _, state, folder = ckpt_mod.load_checkpoint(run)
    assert state["step"] == 2 and folder.name == "step_0000002"
    with pytest.raises(ValueError, match="older checkpoint .*step_0000002 is intact"):
        ckpt_mod.load_checkpoint(latest)  # named explicitly: no silent fallback, but the hint


@pytest.mark.parametrize("content", ["meta.json", "notes.txt"])
def test_out_that_is_not_empty_is_refused_untouched(tmp_path, content):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / content).write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        train(tiny(steps=2), folder)
    assert sorted(p.name for p in folder.iterdir()) == [content]
    assert main(["train", "--recipe", "tiny", "--set", "steps=2", "--out", str(folder)]) == 2


def test_invalid_config_or_data_creates_no_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny", "--set", "steps=-1", "--out", str(out)]) == 2
    assert main(["train", "--recipe", "tiny", "--set", "model.kv_shift_init=bogus", "--out", str(out)]) == 2
    assert main(["train", "--recipe", "tiny", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    cfg = tiny(**{"data.source": "prepared", "data.path": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError):
        train(cfg, out)
    assert not out.exists()


def test_nan_stop_is_one_line_and_non_zero(tmp_path, monkeypatch, capsys):
    real = loop._nll_sum
    calls = {"n": 0}

    def poisoned(model, batch, device, autocast):
        nll, n = real(model, batch, device, autocast)
        calls["n"] += 1
        return (nll * float("nan") if calls["n"] > 3 else nll), n

    monkeypatch.setattr(loop, "_nll_sum", poisoned)
    rc = main(["train", "--recipe", "tiny", "--out", str(tmp_path / "run"), *[a for s in SMALL for a in ("--set", s)],
               "--set", "steps=10", "--set", "ckpt_every=2", "--set", "eval_every=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    last = err[-1]
    assert "Traceback" not in "\n".join(err) and "step 4" in last and "nan" in last
    assert "step_0000002" in last and (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()


def test_nan_before_any_checkpoint_says_none_was_kept(tmp_path, monkeypatch):
    real = loop._nll_sum
    monkeypatch.setattr(loop, "_nll_sum", lambda *a: (lambda nll, n: (nll * float("nan"), n))(*real(*a)))
    with pytest.raises(loop.TrainingDiverged, match="no checkpoint was written"):
        train(tiny(steps=4), tmp_path / "run")


def test_a_second_signal_aborts_at_once_without_saving(tmp_path, monkeypatch):
    real = loop.lr_factor

    def twice_at_step_2(step, total, cfg):  # called once per parameter group: two signals in one step
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, total, cfg)

    monkeypatch.setattr(loop, "lr_factor", twice_at_step_2)
    with pytest.raises(KeyboardInterrupt) as info:
        train(tiny(steps=10, eval_every=10, ckpt_every=0), tmp_path / "run")
    assert not isinstance(info.value, TrainingInterrupted)
    assert steps_on_disk(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
