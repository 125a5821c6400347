"""The README's library-tour snippets run as written, and its two commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    nxt = re.search(r"^## ", text[start + 3:], flags=re.M)
    return text[start: start + 3 + nxt.start()] if nxt else text[start:]


def test_library_tour_snippets_run():
    if not README.exists():
        pytest.skip("README.md not written yet")
    blocks = re.findall(r"```python\n(.*?)```", _section(README.read_text(), "What is in the box"), flags=re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    if not README.exists():
        pytest.skip("README.md not written yet")
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh --test && .venv/bin/python -m pytest"
    assert test_cmd in text and test_cmd in ci
    assert "bash scripts/setup.sh && .venv/bin/kvshift reproduce induction" in text


def test_setup_installs_test_only_packages_only_with_test():
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for test_only in ("pytest", "triton", "lm-eval", "datasets", "hypothesis"):
        assert test_only not in core and test_only in " ".join(project["optional-dependencies"]["dev"]).lower()
    script = (README.parent / "scripts" / "setup.sh").read_text()
    assert 'EXTRAS=""' in script and '--test|--dev) EXTRAS="[dev]"' in script and '-e ".${EXTRAS}"' in script
