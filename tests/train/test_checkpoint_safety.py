"""Checkpoints load without running code: weights_only optimizer files, exact RNG round trip, crafted files
refused (library and `kvshift train --resume`), format-1 checkpoints of earlier versions still resume exactly."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kvshift.cli import main
from kvshift.train import checkpoint as ckpt_mod
from kvshift.train.config import TrainConfig, apply_overrides
from kvshift.train.loop import train
from kvshift.train.recipes import get_recipe

SMALL = ["progress=false", "tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64",
         "data.seq_len=32", "data.batch_size=4", "data.byte_files=8", "threads=1", "eval_every=100"]


def tiny(**sets) -> TrainConfig:
    return apply_overrides(get_recipe("tiny"), SMALL + [f"{k}={v}" for k, v in sets.items()])


class _WritesMarker:
    """Unpickling this runs ``exec``, which writes ``marker``: what a malicious shared checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _craft(path: Path, marker: Path) -> None:
    torch.save({"optimizer": {"state": {}, "param_groups": [_WritesMarker(marker)]}, "rng": {}}, path)


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist())


def test_rng_state_survives_a_weights_only_round_trip_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leaves a cached gaussian in python's and numpy's state
    buf = io.BytesIO()
    torch.save(ckpt_mod.rng_state(), buf)
    expected = _draws()
    buf.seek(0)
    ckpt_mod.set_rng_state(torch.load(buf, weights_only=True))
    assert _draws() == expected


def test_checkpoint_files_need_no_allowlisted_global(tmp_path):
    train(tiny(steps=2), tmp_path / "run")
    optim = tmp_path / "run" / "checkpoints" / "step_0000002" / ckpt_mod.OPTIM_FILE
    assert torch.serialization.get_unsafe_globals_in_checkpoint(optim) == []
    payload = torch.load(optim, weights_only=True)
    assert payload["format"] == ckpt_mod.OPTIM_FORMAT and payload["optimizer"]["state"]


def test_crafted_optimizer_file_is_refused_and_never_run(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(steps=4, ckpt_every=2, keep_checkpoints=2), run)
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "probe-ran"
    _craft(probe, probe_marker)
    torch.load(probe, weights_only=False)  # the payload is real: a full unpickle runs it
    assert probe_marker.read_text() == "code ran"

    marker = tmp_path / "ran"
    latest = run / "checkpoints" / "step_0000004"
    _craft(latest / ckpt_mod.OPTIM_FILE, marker)
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match=r"refusing to load .*step_0000004.*optimizer\.pt.*exec"):
        ckpt_mod.load_checkpoint(run)  # refused, not skipped in favour of the intact step_0000002
    with pytest.raises(ckpt_mod.UnsafeCheckpointError):
        ckpt_mod.load_checkpoint(latest)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "steps=6"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]


def test_crafted_file_in_an_older_checkpoint_is_refused_too(tmp_path):
    run = tmp_path / "run"
    train(tiny(steps=4, ckpt_every=2, keep_checkpoints=2), run)
    (run / "checkpoints" / "step_0000004" / ckpt_mod.MODEL_FILE).write_bytes(b"damaged")
    marker = tmp_path / "ran"
    _craft(run / "checkpoints" / "step_0000002" / ckpt_mod.OPTIM_FILE, marker)
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match="step_0000002"):
        ckpt_mod.load_checkpoint(run)
    assert not marker.exists()


def test_truncated_optimizer_file_is_damage_not_a_refusal(tmp_path):
    run = tmp_path / "run"
    train(tiny(steps=2), run)
    optim = run / "checkpoints" / "step_0000002" / ckpt_mod.OPTIM_FILE
    optim.write_bytes(optim.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        ckpt_mod.load_checkpoint(run)
    assert not isinstance(info.value, ckpt_mod.UnsafeCheckpointError)


def _legacy_save(real_save):
    """``torch.save`` as kvshift 0.1.0 wrote optimizer.pt: no format key, RNG states as numpy / python tuples."""

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(ckpt_mod.OPTIM_FILE):
            rng = obj["rng"]
            npy = rng["numpy"]
            obj = {"optimizer": obj["optimizer"], "rng": {
                "python": (rng["python"]["version"], tuple(rng["python"]["state"]), rng["python"]["gauss_next"]),
                "numpy": (npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"],
                          npy["has_gauss"], npy["cached_gaussian"]),
                "torch": rng["torch"], "cuda": rng["cuda"]}}
        return real_save(obj, f, *args, **kwargs)

    return save


def test_checkpoint_of_the_previous_format_still_resumes_exactly(tmp_path, monkeypatch):
    full = train(tiny(steps=6), tmp_path / "full")["losses"]
    with monkeypatch.context() as m:
        m.setattr(ckpt_mod.torch, "save", _legacy_save(torch.save))
        first = train(tiny(steps=6, stop_after=3), tmp_path / "split")["losses"]
    optim = tmp_path / "split" / "checkpoints" / "step_0000003" / ckpt_mod.OPTIM_FILE
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(optim)  # really format 1
    second = train(tiny(steps=6), tmp_path / "split", resume=tmp_path / "split")["losses"]
    assert first + second == full  # bit-identical on CPU
