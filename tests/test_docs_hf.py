"""docs/huggingface.md runs: its Python blocks and shell commands, on tiny local models."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import build_source
from test_hf_auto import make_tokenizer, save_tiny

from kvshift.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "huggingface.md"
HUB_SOURCE, CONVERTED = "Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b-kvshift"  # the names the shell examples use


def blocks(text: str, lang: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def shell_commands(text: str) -> list[str]:
    cmds = []
    for block in blocks(text, "bash"):
        cmds += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return cmds


DOC_TEXT = DOC.read_text()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A tiny kvshift model and a tiny Qwen2 source checkpoint (each with the tiny tokenizer)."""
    save_tiny(tmp_path / "model")
    source = build_source("qwen2_gqa")
    source.save_pretrained(tmp_path / HUB_SOURCE)  # Qwen/Qwen2.5-0.5B as a local directory
    make_tokenizer().save_pretrained(tmp_path / HUB_SOURCE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def namespace(ws: Path) -> dict:
    return {"MODEL_DIR": str(ws / "model"), "SAVE_DIR": str(ws / "saved"), "SOURCE": str(ws / HUB_SOURCE),
            "CONVERTED_DIR": str(ws / "converted"), "__name__": "docs_snippet"}


def test_doc_has_the_four_parts():
    py, sh = blocks(DOC_TEXT, "python"), shell_commands(DOC_TEXT)
    assert len(py) >= 4
    for needle in ("from_pretrained", "generate(", "convert_checkpoint", "simple_evaluate"):
        assert any(needle in b for b in py), needle
    for needle in ("kvshift convert", "kvshift generate", "kvshift eval", "cli_evaluate"):
        assert any(needle in c for c in sh), needle


def test_readme_points_to_the_doc():
    """The README keeps a short Hugging Face tour (run by tests/test_docs_commands.py) and sends the details here."""
    assert "docs/huggingface.md" in (ROOT / "README.md").read_text()


def test_python_snippets_run(workspace):
    ns = namespace(workspace)
    for code in blocks(DOC_TEXT, "python"):
        if "lm_eval" not in code:
            exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - running the documentation is the test
    assert type(ns["model"]).__name__ == "KVShiftForCausalLM"
    assert ns["beams"].shape[0] == 4 and ns["sampled"].shape[0] == 2
    assert (workspace / "converted" / "model.safetensors").is_file()


def test_kvshift_commands_parse():
    for cmd in shell_commands(DOC_TEXT):
        argv = shlex.split(cmd)
        if argv[0] == "kvshift":
            build_parser(argv[1]).parse_args(argv[1:])  # SystemExit on an undocumented flag


def test_convert_and_generate_commands_run(workspace, capsys):
    for cmd in shell_commands(DOC_TEXT):
        argv = shlex.split(cmd)
        if argv[:2] in (["kvshift", "convert"], ["kvshift", "generate"]):
            assert main(argv[1:]) == 0, cmd
    assert "The capital of France is" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    source = build_source("qwen2_gqa")
    model = AutoModelForCausalLM.from_pretrained(workspace / CONVERTED)
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() <= 1e-5


def test_eval_snippet_and_commands_run(workspace, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import datasets
    from test_lm_eval import LL_TASK, write_tasks

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(workspace / "datasets_cache"))

    (workspace / "tasks").mkdir()
    write_tasks(workspace / "tasks")
    ns = {**namespace(workspace), "TASKS": [LL_TASK], "TASK_DIR": str(workspace / "tasks")}
    for code in blocks(DOC_TEXT, "python"):
        if "lm_eval" in code:
            exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102
    assert LL_TASK in ns["results"]["results"]

    save_tiny(workspace / CONVERTED)  # the model directory the shell examples evaluate
    local_tasks = f"{LL_TASK} --limit 3"
    for cmd in shell_commands(DOC_TEXT):
        if cmd.startswith("kvshift eval"):
            cmd = re.sub(r"--tasks \S+", f"--tasks {local_tasks} --include-path tasks --bootstrap-iters 0", cmd)
            assert main(shlex.split(cmd)[1:]) == 0, cmd
            assert (workspace / "results.json").is_file()
        elif "cli_evaluate" in cmd:  # plain lm_eval, started after `import kvshift`
            cmd = re.sub(r"--tasks \S+", f"--tasks {local_tasks} --include_path tasks", cmd)
            cmd += " --output_path lm_eval_out"
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "HF_DATASETS_CACHE": str(workspace / "datasets_cache"),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            proc = subprocess.run(["bash", "-c", cmd], cwd=workspace, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert LL_TASK in proc.stdout
            assert list((workspace / "lm_eval_out").glob("**/results_*.json"))
