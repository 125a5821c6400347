"""The bottom floor of the house: Markdown tables, the environment record, and atomic writes of text,
JSON and figures (temporary file beside the target, then ``os.replace``: nothing already written is lost)."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["staged_dir", "atomic_write_text", "atomic_write_json", "to_jsonable", "markdown_table", "environment",
           "mean_std", "get_pyplot", "save_figure", "apply_umask", "replace_dir"]


def _umask() -> int:
    umask = os.umask(0o077)  # reading the umask sets it: set a safe value for that instant
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (``mkstemp`` files are private, 0600)."""
    return 0o666 & ~_umask()


def apply_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the mode a plain ``mkdir`` / ``open`` gives.

    For folders about to be renamed into place: ``tempfile.mkdtemp`` folders are private (0700), and so are
    the files safetensors >= 0.8 writes (0600, safetensors/safetensors#782), which would leave a saved model
    unreadable to other users and containers.
    """
    path = Path(path)
    umask = _umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, dir_mode if p.is_dir() else file_mode)
    return path


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder ``new`` to ``out`` (same file system). A missing or empty ``out`` is
    replaced at once; a non-empty one is moved aside first, put back if the swap fails and removed once it
    succeeds. Whether ``out`` may be replaced at all is the caller's decision (``--overwrite``)."""
    import shutil

    new, out = Path(new), Path(out)
    old = None
    try:
        if out.exists():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "previous")
        os.replace(new, out)
    except BaseException:
        if old is not None and (old / "previous").exists() and not out.exists():
            os.replace(old / "previous", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A new private folder beside ``out`` for the block to write a whole output folder into. When the block
    succeeds the folder gets the modes a plain ``mkdir`` gives (:func:`apply_umask`) and replaces ``out``
    (:func:`replace_dir`); when it fails the folder is removed and ``out`` is left as it was."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_replace(path: Path, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Tuples, paths, numpy / torch scalars and arrays and non-finite floats as strict-JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        try:
            return to_jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, default: Callable[[Any], Any] | None = None,
                      strict: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically. ``strict``: convert it with :func:`to_jsonable` first
    (no NaN); otherwise ``default`` serialises what ``json`` cannot."""
    payload = to_jsonable(obj) if strict else obj
    text = json.dumps(payload, indent=2, allow_nan=not strict, default=default, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def _fmt(value: Any, digits: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if digits is not None:
            return f"{value:.{digits}f}"
        if value == 0.0:
            return "0"
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``; a missing field is an empty
    cell. Floats get ``digits`` decimals, or by default 4 (scientific when tiny or huge)."""
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c], digits) if c in row else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where a result was measured: CPU model and cores, GPU (if any), platform, Python / torch / triton /
    transformers versions and the UTC date."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value) of ``values``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def get_pyplot() -> Any:
    """Select matplotlib's non-interactive Agg backend and return ``matplotlib.pyplot``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically and close it."""
    plt = get_pyplot()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        _atomic_replace(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"),
                        suffix=f".tmp.{fmt}")
    finally:
        plt.close(fig)
    return path
