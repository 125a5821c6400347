"""Tests that bad input to `kvshift data prepare` fails early with a clear error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvshift.data import prepare
from kvshift.data.sources import resolve_source


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "nope.txt"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "nope"), tmp_path / "out")  # starts with '/': a path, not a dataset name
    assert not (tmp_path / "out").exists()


def test_glob_without_matches(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no files match"):
        prepare(str(tmp_path / "*.jsonl"), tmp_path / "out")


def test_directory_without_files(tmp_path: Path) -> None:
    (tmp_path / "src" / ".git").mkdir(parents=True)
    (tmp_path / "src" / ".git" / "HEAD").write_text("ref", encoding="utf-8")  # hidden: never read
    with pytest.raises(FileNotFoundError, match="contains no files"):
        prepare(str(tmp_path / "src"), tmp_path / "out")


def test_only_binary_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="every file was skipped .1 binary"):
        prepare(str(tmp_path / "a.bin"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("", encoding="utf-8")
    (src / "b.txt").write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare(str(src), tmp_path / "out", vocab_size=300)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare(str(empty), tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_jsonl_missing_text_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hello", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'text'.*available keys: \['body', 'id'\]"):
        prepare(str(path), tmp_path / "out", vocab_size=300)


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        prepare(str(path), tmp_path / "out", vocab_size=300)
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a string"):
        prepare(str(path), tmp_path / "out", vocab_size=300)


def test_parquet_missing_text_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a", "b"], "n": [1, 2]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"'text'.*available columns: \['content', 'n'\]"):
        resolve_source(str(tmp_path / "d.parquet"))


def test_bad_numbers(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    with pytest.raises(ValueError, match="validation fraction"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ValueError, match="max_docs"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", max_docs=0)
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", vocab_size=100)


def test_all_documents_in_val(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    with pytest.raises(ValueError, match="validation split"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", val_fraction=0.999999, vocab_size=300)


def test_output_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    (tmp_path / "out").write_text("not a dir", encoding="utf-8")
    with pytest.raises(ValueError, match="not a directory"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", vocab_size=300)


def test_stale_shards_without_meta(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="no meta.json"):
        prepare(str(tmp_path / "a.txt"), out, vocab_size=300)
    prepare(str(tmp_path / "a.txt"), out, vocab_size=300, val_fraction=0.0, overwrite=True)
    assert (out / "meta.json").is_file()


def test_unknown_hf_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def not_found(name, config=None, *, split=None, streaming=False):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor"):
        prepare("my_corpus", tmp_path / "out")
