"""The import graph of src/kvshift points one way, floor by floor, as the README's Layout section says."""

from __future__ import annotations

import ast
from pathlib import Path

import kvshift

SRC = Path(kvshift.__file__).resolve().parent
FLOORS = [{"report", "paths", "ops"}, {"layers"}, {"models"}, {"tasks", "data", "eval", "bench"}, {"train", "serving", "export"},
          {"experiments"}, {"commands"}, {"cli"}, {"__main__", "__init__"}]


def _floor(unit: str) -> int:
    return next(i for i, f in enumerate(FLOORS) if unit in f)


def _imports() -> set[tuple[str, str]]:
    edges = set()
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level > 0:
                base = list(rel.parts[:-1])[: max(0, len(rel.parts) - node.level)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("kvshift."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target and target[0] != unit:
                edges.add((unit, target[0]))
    return edges


def test_imports_point_down_and_never_sideways():
    edges = _imports()
    assert ("train", "data") in edges and ("experiments", "train") in edges  # the graph is really read
    bad = sorted((a, b) for a, b in edges if a != "__init__" and _floor(b) >= _floor(a))
    assert bad == [], f"imports that run up or sideways: {bad}"


def test_every_unit_has_a_floor():
    units = {p.name if p.is_dir() else p.stem for p in SRC.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert units <= set().union(*FLOORS)
