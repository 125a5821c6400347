"""Shared helpers of the paper experiments: atomic results JSON / Markdown / config writers and plotting."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "ROW_COLUMNS",
    "atomic_write_text",
    "get_pyplot",
    "markdown_table",
    "mean_std",
    "save_figure",
    "write_results",
]

# The fields every row of a results.json carries, in table order.
ROW_COLUMNS: tuple[str, ...] = ("model", "layers", "kv_shift", "metric", "mean", "std", "seeds")


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (``mkstemp`` files are private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_replace(path: Path, write: Any, suffix: str = ".tmp") -> Path:
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
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    return _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns`` (default: :data:`ROW_COLUMNS`).

    A missing field renders as an empty cell; floats get 4 decimals (scientific when tiny or huge).
    """
    columns = list(columns) if columns is not None else list(ROW_COLUMNS)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) if c in row else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    """Convert tuples, paths, numpy / torch scalars and non-finite floats into strict-JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        try:
            return _jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _jsonable(obj.tolist())
    return str(obj)


def write_results(
    out_dir: str | os.PathLike,
    name: str,
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``config.json`` into ``out_dir``; return the payload.

    ``results.json`` is ``{"experiment": name, "rows": rows, **extra, "environment": {...}}``; every row
    should carry :data:`ROW_COLUMNS` (missing ones raise). ``results.md`` holds a title, the rows as a
    Markdown table and ``extra["notes"]`` (a string or list of strings) when given. Each file is written
    atomically (temporary file, then ``os.replace``).
    """
    rows = [dict(r) for r in rows]
    for i, row in enumerate(rows):
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row {i} of {name!r} lacks the field(s) {missing}: {row}")
    extra = dict(extra or {})
    for key in ("experiment", "rows"):
        if key in extra:
            raise ValueError(f"extra may not override {key!r}")
    payload: dict[str, Any] = {"experiment": name, "rows": rows, **extra}
    payload.setdefault("environment", _environment())
    payload = _jsonable(payload)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "config.json", json.dumps(_jsonable(config), indent=2, allow_nan=False) + "\n")
    md = [f"# {name}", "", markdown_table(rows, columns)]
    notes = extra.get("notes")
    if notes:
        md.append("")
        md.extend(f"- {n}" for n in ([notes] if isinstance(notes, str) else notes))
        md.append("")
    atomic_write_text(out / "results.md", "\n".join(md))
    return payload


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return env


def get_pyplot() -> Any:
    """Select matplotlib's non-interactive Agg backend and return ``matplotlib.pyplot``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (temporary file, then ``os.replace``) and close it."""
    plt = get_pyplot()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        _atomic_replace(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"),
                        suffix=f".tmp.{fmt}")
    finally:
        plt.close(fig)
    return path
