"""Every folder kvshift writes (convert output, a training run with its checkpoints and final model, prepared
data) gets the permissions the umask gives a plain mkdir / open, not a temporary folder's private 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

UMASK = 0o027  # not the usual 0o022, so that a hard-coded mode cannot pass by chance


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _check(root: Path, mask: int) -> None:
    modes = _modes(root)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != ((0o777 if (root.parent / name).is_dir() else 0o666) & ~mask)}
    assert len(modes) > 1 and not wrong, wrong


def test_convert_output_respects_the_umask(tmp_path, umask):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "models"))
    from test_convert import build_source
    from test_hf_auto import make_tokenizer

    from kvshift.cli import main

    src = build_source("llama_mha")
    src.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    assert main(["convert", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "kv")]) == 0
    _check(tmp_path / "kv", umask)
    assert main(["convert", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "kv"), "--overwrite"]) == 0
    _check(tmp_path / "kv", umask)


def test_training_run_respects_the_umask(tmp_path, umask):
    from kvshift.train.config import apply_overrides
    from kvshift.train.loop import train
    from kvshift.train.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny"), ["steps=2", "progress=false", "tensorboard=false", "threads=1",
                                               "model.hidden_size=32", "model.intermediate_size=64",
                                               "data.seq_len=32", "data.batch_size=2", "data.byte_files=4"])
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "final").is_dir() and list((tmp_path / "run" / "checkpoints").glob("step_*"))
    _check(tmp_path / "run", umask)


def test_prepared_data_respects_the_umask(tmp_path, umask):
    from kvshift.data.shards import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: the cat sat on the mat, {i} times over.\n" * 5)
    out = prepare(str(corpus), tmp_path / "data", vocab_size=300, val_fraction=0.3, progress=False)
    _check(out, umask)
