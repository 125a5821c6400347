"""`kvshift data prepare` reads plain-text files of any extension; binary and non-UTF-8 files are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvshift.commands.data import main
from kvshift.data import TokenDataset, prepare
from kvshift.data.sources import FileSource


def _tree(root: Path) -> Path:
    src = root / "repo"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "README.md").write_text("# Title\n\nSome *Markdown* text about the code.\n")
    (src / "pkg" / "mod.py").write_text("def f(x):\n    return x + 1\n" * 5)
    (src / "pkg" / "sub" / "util.rs").write_text("fn main() { println!(\"hi\"); }\n" * 5)
    (src / "pkg" / "notes").write_text("a file with no extension\n")
    (src / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "pkg" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (src / ".git" / "config").write_text("[core]\n")
    return src


def test_directory_of_code_and_markdown_is_read_recursively_in_order(tmp_path):
    src = _tree(tmp_path)
    fs = FileSource(str(src))
    rel = [p.relative_to(src).as_posix() for p in fs.files]
    assert rel == ["README.md", "pkg/mod.py", "pkg/notes", "pkg/sub/util.rs"]  # sorted, hidden skipped
    assert fs.skipped == {"binary": 1, "non-UTF-8": 1}
    docs = list(fs)
    assert [d.key for d in docs] == rel
    assert docs[1].text == (src / "pkg" / "mod.py").read_text()


def test_include_and_exclude_globs(tmp_path):
    src = _tree(tmp_path)
    rel = lambda fs: [p.relative_to(src).as_posix() for p in fs.files]  # noqa: E731
    assert rel(FileSource(str(src), include=["*.py", "*.md"])) == ["README.md", "pkg/mod.py"]
    assert rel(FileSource(str(src), exclude=["pkg/sub/*", "notes"])) == ["README.md", "pkg/mod.py"]
    with pytest.raises(FileNotFoundError, match="--include/--exclude"):
        FileSource(str(src), include=["*.java"])


def test_prepare_cli_counts_skipped_files(tmp_path, capsys):
    src = _tree(tmp_path)
    out = tmp_path / "data"
    assert main(["--source", str(src), "--out", str(out), "--vocab-size", "300", "--split-val", "0",
                 "--exclude", "*.rs", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 binary and 1 non-UTF-8 files" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["docs"] == 3
    assert meta["source_info"]["skipped_binary"] == 1 and meta["source_info"]["exclude"] == ["*.rs"]
    ds = TokenDataset(out, "train")
    assert ds.num_docs == 3


def test_single_file_of_any_extension(tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("echo hello world\n" * 20)
    out = prepare(str(f), tmp_path / "o", vocab_size=300, val_fraction=0.0, progress=False)
    assert TokenDataset(out, "train").num_docs == 1
