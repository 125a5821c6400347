"""Packaging: pyproject metadata a current setuptools accepts without warnings, and a wheel that holds every module."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_its_file():
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str), "project.license as a table is deprecated by setuptools"
    assert re.fullmatch(r"[A-Za-z0-9.\-+]+( (AND|OR|WITH) [A-Za-z0-9.\-+]+)*", project["license"])
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))  # forbidden beside SPDX
    for pattern in project["license-files"]:
        assert list(ROOT.glob(pattern)), f"license-files entry {pattern!r} matches no file"
    setuptools = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.search(r">=\s*(\d+)", setuptools[0])
    assert minimum and int(minimum.group(1)) >= 77, "SPDX license strings need setuptools>=77"


def test_wheel_holds_every_module_the_license_and_the_command(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", *PYPROJECT["project"]["license-files"]):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src" / "kvshift", tree / "src" / "kvshift", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = ("import sys; from setuptools import build_meta as b; "
             "print(b.build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tree,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # e.g. setuptools' deprecation of a license table
    wheel = zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1])
    names = set(wheel.namelist())
    modules = {p.relative_to(tree / "src").as_posix() for p in (tree / "src" / "kvshift").rglob("*.py")}
    assert modules and not modules - names, sorted(modules - names)
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert f"License-Expression: {PYPROJECT['project']['license']}" in metadata
    assert "kvshift = kvshift.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
