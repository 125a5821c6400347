"""What every experiment writes: results JSON / Markdown / config in one call (built on :mod:`kvshift.report`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..report import (  # noqa: F401  (re-exported for the experiment modules)
    atomic_write_text,
    environment,
    get_pyplot,
    markdown_table,
    mean_std,
    save_figure,
    to_jsonable,
)

__all__ = ["ROW_COLUMNS", "write_results", "model_styles", "prepare_lm_run"]

# The fields every row of a results.json carries, in table order.
ROW_COLUMNS: tuple[str, ...] = ("model", "layers", "kv_shift", "metric", "mean", "std", "seeds")


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
    payload.setdefault("environment", environment())
    payload = to_jsonable(payload)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "config.json", json.dumps(to_jsonable(config), indent=2, allow_nan=False) + "\n")
    md = [f"# {name}", "", markdown_table(rows, list(columns) if columns is not None else list(ROW_COLUMNS))]
    notes = extra.get("notes")
    if notes:
        md.append("")
        md.extend(f"- {n}" for n in ([notes] if isinstance(notes, str) else notes))
        md.append("")
    atomic_write_text(out / "results.md", "\n".join(md))
    return payload


def model_styles(kv_shift: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Matplotlib styles for models ``{name: uses KV shift}``: a vanilla model and the KV-shifting model of
    the same size (``vanilla-XS`` / ``kvshift-XS``) share a colour; KV shifting is solid, vanilla dashed."""
    palette = [f"C{i}" for i in range(10)]
    colours: dict[str, str] = {}
    out = {}
    for name, kv in kv_shift.items():
        size = name.split("-", 1)[1] if "-" in name else name
        colour = colours.setdefault(size, palette[len(colours) % len(palette)])
        out[name] = {"color": colour, "linestyle": "-" if kv else "--"}
    return out


def prepare_lm_run(out: Path, data: str | None, name: str) -> None:
    """Before an experiment with a language-model workload: refuse an ``out`` that already holds runs
    (nothing in it is touched), and prepare ``data/stdlib`` (what the workload reads) when no ``data``
    folder is given and it is missing."""
    import sys

    out = Path(out)
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise FileExistsError(f"{out} already holds runs; choose another out folder or remove {out / 'runs'}")
    if data is None and not (Path("data/stdlib") / "meta.json").exists():
        from ..data.shards import prepare

        print(f"{name}: preparing data/stdlib (the stdlib BPE corpus, about 20 s)", file=sys.stderr)
        prepare("stdlib", "data/stdlib")
