"""Atomic checkpoints: model (safetensors), optimizer, RNG and data position, written to a temp dir then renamed.

Every file loads without running code: the model is safetensors, the trainer state JSON, and ``optimizer.pt``
holds only tensors and plain containers (the RNG states as lists and tensors), loaded with
``torch.load(weights_only=True)``. ``optimizer.pt`` files written before this format (format 1, with numpy's
and python's RNG state as pickled objects) still load under the same restricted unpickler, with only numpy's
array and dtype types allowed in addition; a file that asks for anything else is refused
(:class:`UnsafeCheckpointError`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..report import apply_umask

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "older_checkpoints",
           "run_dir_of", "rng_state", "set_rng_state", "load_optimizer_file", "UnsafeCheckpointError"]

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"
OPTIM_FORMAT = 2  # 1: kvshift <= 0.1.0 (numpy / python RNG state pickled as objects); 2: plain containers only


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would import or call something other than tensors and plain containers."""


def rng_state() -> dict:
    """The python, numpy, torch and CUDA RNG states as lists, numbers and tensors (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "numpy": {"bit_generator": str(name), "key": [int(k) for k in key], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or the format-1 tuples, which :func:`_read` converts)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _legacy_rng(state: dict) -> dict:
    """Format 1's RNG entry (``random.getstate()`` tuple, ``np.random.get_state()`` tuple) in format 2."""
    try:
        version, internal, gauss = state["python"]
        name, key, pos, has_gauss, cached = state["numpy"]
        if not (isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.ndim == 1):
            raise TypeError(f"numpy key is {type(key).__name__} {getattr(key, 'dtype', '')}, expected uint32 array")
        return {"python": {"version": int(version), "state": [int(v) for v in internal],
                           "gauss_next": None if gauss is None else float(gauss)},
                "numpy": {"bit_generator": str(name), "key": [int(k) for k in key], "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "torch": state["torch"], "cuda": state.get("cuda")}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"unexpected RNG state in a format-1 {OPTIM_FILE}: {err}") from err


def _numpy_globals() -> list:
    """What ``pickle`` needs to rebuild a numpy array of numbers (format 1's numpy RNG key), nothing more."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_NUMPY_NAMES = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                "numpy.dtype", "numpy.dtypes.UInt32DType"}


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a file torch cannot even scan: the refusal names no global
        return []


def load_optimizer_file(path: str | os.PathLike) -> dict:
    """Load ``optimizer.pt`` with ``torch.load(weights_only=True)``: ``{"optimizer", "rng"}``, RNG in format 2.

    Raises :class:`UnsafeCheckpointError` for a file that needs any global beyond tensors, plain containers and
    (format 1 only) numpy's array and dtype types; its pickle is never run by the full unpickler.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        names = _unsafe_globals(path)
        if not names or not set(names) <= _NUMPY_NAMES:
            what = ", ".join(names) if names else "objects that are not tensors or plain containers"
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it would import {what} when unpickled (kvshift checkpoints hold "
                f"only tensors and plain containers); it was not written by kvshift's trainer - do not resume "
                f"from it unless you rebuild it from a source you trust") from None
        with torch.serialization.safe_globals(_numpy_globals()):  # format 1: numpy arrays, still restricted
            payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "format" in payload:
            raise UnsafeCheckpointError(f"refusing to load {path}: numpy objects in a format-{OPTIM_FORMAT} "
                                        f"optimizer file, which kvshift never writes") from None
    if not isinstance(payload, dict) or "optimizer" not in payload or "rng" not in payload:
        raise ValueError(f"{path} is not a kvshift optimizer file (expected a dict with 'optimizer' and 'rng')")
    if payload.get("format", 1) == 1:
        payload = {"format": OPTIM_FORMAT, "optimizer": payload["optimizer"], "rng": _legacy_rng(payload["rng"])}
    elif payload["format"] != OPTIM_FORMAT:
        raise ValueError(f"{path} has optimizer format {payload['format']}; this kvshift reads formats 1 and "
                         f"{OPTIM_FORMAT}: upgrade kvshift")
    return payload


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
    torch.save({"format": OPTIM_FORMAT, "optimizer": optim_state, "rng": rng_state()}, tmp / OPTIM_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    apply_umask(tmp)  # safetensors >= 0.8 writes its file private (0600)
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
        optim = load_optimizer_file(folder / OPTIM_FILE)
        state = json.loads((folder / STATE_FILE).read_text())
    except UnsafeCheckpointError:
        raise
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
    one if there is one. A file that would run code when unpickled raises :class:`UnsafeCheckpointError`
    (no fallback: a foreign file in a run folder is the user's to look at, not damage to skip).
    """
    folder = latest_checkpoint(path)
    try:
        return (*_read(folder), folder)
    except UnsafeCheckpointError:  # not damage but a foreign file: refused, never skipped over silently
        raise
    except ValueError as err:
        explicit = (Path(path) / STATE_FILE).exists()
        for candidate in older_checkpoints(folder):
            try:
                payload = _read(candidate)
            except UnsafeCheckpointError:
                raise
            except ValueError:
                continue
            if explicit:
                raise ValueError(f"{err}; the older checkpoint {candidate} is intact: resume from it "
                                 f"with --resume {candidate}") from err
            warnings.warn(f"{err}; falling back to the older intact checkpoint {candidate}", stacklevel=2)
            return (*payload, candidate)
        raise
