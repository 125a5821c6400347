"""Atomic checkpoints: model (safetensors), optimizer, RNG and data position, written to a temp dir then renamed."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "older_checkpoints", "run_dir_of", "rng_state",
           "set_rng_state"]

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, optim_state: dict, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically and point ``latest`` at it.

    The files go to a hidden temporary folder first; only a complete, fsynced folder is renamed into
    place, and ``latest`` is replaced after that, so a crash at any moment leaves the previous checkpoint
    loadable. Older checkpoints beyond ``keep`` are removed afterwards.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, seen = {}, set()
    for k, v in model_state.items():  # tied weights share storage: store an independent copy of repeats
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
    torch.save({"optimizer": optim_state, "rng": rng_state()}, tmp / OPTIM_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    latest_tmp = ckpt_root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run folder a ``--resume`` path belongs to: the path itself for a run folder, the parent of a
    ``checkpoints`` folder, the grandparent of a ``checkpoints/step_*`` folder."""
    path = Path(path)
    if (path / STATE_FILE).exists() or path.name.startswith("step_"):
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        return path.parent
    return path


def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The complete ``step_*`` folders of a run (or of its ``checkpoints`` folder), oldest first."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists())


def older_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints of ``folder``'s run that are older than it, newest first (the fall-backs)."""
    return [p for p in reversed(list_checkpoints(folder.parent)) if p.name < folder.name]


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run dir, its ``checkpoints`` dir or a ``step_*`` dir to one checkpoint folder."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such run or checkpoint folder: {path}")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / "latest").exists():
        cand = root / (root / "latest").read_text().strip()
        if (cand / STATE_FILE).exists():
            return cand
    steps = list_checkpoints(root)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {path} (expected {STATE_FILE} under checkpoints/step_*)")
    return steps[-1]


def _read(folder: Path) -> tuple[dict, dict, dict]:
    try:
        model_state = load_file(str(folder / MODEL_FILE))
        optim = torch.load(folder / OPTIM_FILE, map_location="cpu", weights_only=False)
        state = json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError as err:
        raise ValueError(f"checkpoint {folder} is incomplete: {err}") from err
    except Exception as err:  # safetensors / pickle / json errors on truncated or corrupt files
        raise ValueError(f"checkpoint {folder} is corrupt or truncated: {type(err).__name__}: {err}") from err
    return model_state, optim, state


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict, Path]:
    """``(model_state, optimizer_payload, trainer_state, folder)``.

    ``path`` is a run folder, its ``checkpoints`` folder or one ``step_*`` folder. When the latest
    checkpoint of a run is damaged, the newest intact older one is loaded instead, with a warning that
    names both. A damaged checkpoint named explicitly raises ValueError, naming the newest intact older
    one if there is one.
    """
    folder = latest_checkpoint(path)
    try:
        return (*_read(folder), folder)
    except ValueError as err:
        explicit = (Path(path) / STATE_FILE).exists()
        for candidate in older_checkpoints(folder):
            try:
                payload = _read(candidate)
            except ValueError:
                continue
            if explicit:
                raise ValueError(f"{err}; the older checkpoint {candidate} is intact: resume from it "
                                 f"with --resume {candidate}") from err
            warnings.warn(f"{err}; falling back to the older intact checkpoint {candidate}", stacklevel=2)
            return (*payload, candidate)
        raise
