"""The README stays short and self-sufficient, its two commands are the ones CI uses, and the training commands of
README.md and docs/training.md name real recipes and keys (every snippet and command: tests/test_docs_commands.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING = README.parent / "docs" / "training.md"


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    nxt = re.search(r"^## ", text[start + 3:], flags=re.M)
    return text[start: start + 3 + nxt.start()] if nxt else text[start:]


def test_readme_fits_five_minutes_and_keeps_its_sections():
    """At most about 250 lines; the depth is in docs/ (its snippets and commands: tests/test_docs_commands.py)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for title in ("Two commands", "The paper's claims at this scale", "The op",
                  "The model and the Hugging Face Auto classes", "Training", "Retrofit a pretrained model", "Serving",
                  "Layout", "Citation"):
        assert f"\n## {title}\n" in text, title
    for page in ("experiments", "training", "huggingface", "serving", "performance", "design"):
        assert f"docs/{page}.md" in text, page


def test_readme_alone_gets_from_a_clone_to_a_trained_sampled_and_served_model():
    text = README.read_text()
    section = _section(text, "From a fresh clone")
    for step in ("bash scripts/setup.sh", "kvshift train --recipe tiny",
                 "kvshift generate --model runs/tiny/final --prompt", "bash scripts/setup.sh --serve",
                 "VLLM_CPU_KVCACHE_SPACE=2 .venv-serve/bin/vllm serve runs/tiny/final",
                 "curl -s localhost:8000/v1/completions"):
        assert step in section, step


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
    assert 'EXTRAS=""' in script and '[ "$TEST" = 1 ] && EXTRAS="dev"' in script
    assert '-e ".${EXTRAS:+[$EXTRAS]}"' in script and 'EXTRAS="serve,test,gguf"' in script
    assert "pytest" in " ".join(project["optional-dependencies"]["test"]).lower()
    assert "vllm" not in core and "vllm" not in " ".join(project["optional-dependencies"]["dev"]).lower()


def _training_commands() -> list[list[str]]:
    import shlex

    cmds = []
    text = TRAINING.read_text() + _section(README.read_text(), "From a fresh clone")
    for code in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in code.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("kvshift "):
                cmds.append(shlex.split(line)[1:])
            elif line.startswith("torchrun "):
                argv = shlex.split(line)
                cmds.append(argv[argv.index("kvshift") + 1:])
    return cmds


def test_training_section_commands_parse_and_name_real_recipes_and_keys():
    """Every training command of the README and docs/training.md parses, its recipe exists and its --set keys are
    valid; a --resume of a named checkpoint names one the recipe keeps."""
    from kvshift.cli import build_parser
    from kvshift.train.config import apply_overrides
    from kvshift.train.recipes import RECIPES, get_recipe

    cmds = _training_commands()
    assert len(cmds) >= 10
    for argv in cmds:
        args = build_parser(argv[0]).parse_args(argv)
        if argv[0] == "train" and args.recipe is not None:
            assert args.recipe in RECIPES
            apply_overrides(get_recipe(args.recipe), args.overrides)
        if argv[0] == "train" and args.resume and "step_" in args.resume:
            run = next(c for c in cmds if c[0] == "train" and "--out" in c and
                       c[c.index("--out") + 1] == args.resume.split("/checkpoints")[0])
            cfg = get_recipe(run[run.index("--recipe") + 1])
            steps = sorted({*range(cfg.ckpt_every, cfg.steps + 1, cfg.ckpt_every), cfg.steps})
            kept = [f"step_{s:07d}" for s in steps[-cfg.keep_checkpoints:]]
            assert args.resume.rsplit("/", 1)[-1] in kept, (args.resume, kept)


def test_readme_tiny_training_command_runs_as_written(tmp_path, monkeypatch):
    from kvshift.cli import main

    monkeypatch.chdir(tmp_path)
    argv = next(c for c in _training_commands() if c[:3] == ["train", "--recipe", "tiny"])
    assert main(argv) == 0
    assert (tmp_path / "runs" / "tiny" / "final" / "tokenizer.json").exists()
