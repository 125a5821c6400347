"""report.replace_dir and report.staged_dir: the atomic folder swap behind `kvshift convert` and `kvshift export`."""

from __future__ import annotations

import os

import pytest

from kvshift import report


def _folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def test_replace_dir_puts_the_new_folder_in_place_of_an_old_one(tmp_path):
    out = _folder(tmp_path / "out", "old")
    report.replace_dir(_folder(tmp_path / "new", "new"), out)
    assert (out / "file.txt").read_text() == "new" and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone, no leftovers


def test_replace_dir_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new", "new")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder went aside; putting the new one in place fails
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(report.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        report.replace_dir(new, out)
    assert (out / "file.txt").read_text() == "old" and (new / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_staged_dir_replaces_the_output_only_when_the_block_succeeds(tmp_path):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(RuntimeError):
        with report.staged_dir(out) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "file.txt").read_text() == "old" and not (out / "f.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with report.staged_dir(out) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (out / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()  # the mode mkdir gives, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
