"""Tests of `kvshift data prepare`: shard round trips, determinism, formats, tokenizer options and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvshift.commands.data import add_prepare_arguments, main, run_prepare
from kvshift.data import TokenDataset, load_tokenizer, prepare, read_meta, token_dtype
from kvshift.data.shards import split_of

VOCAB = 400
OUTPUT_FILES = [
    "meta.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "train.bin",
    "train.idx.npy",
    "val.bin",
    "val.idx.npy",
]


def sample_texts() -> list[str]:
    """Varied documents: unicode, CRLF, tabs, a literal EOS string, leading/trailing whitespace."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "def", "return", "héllo", "wörld", "日本語", "emoji 🙂", "x = 1\n"]
    texts = [
        "plain ascii document\n",
        "  leading and trailing spaces  \n\n",
        "windows\r\nline endings\r\n",
        "tabs\tand\ttabs\n\tindented",
        "contains the separator <|endoftext|> literally",
        "<|endoftext|>",
        "\ufeffbyte order mark first",
    ]
    for i in range(40):
        n = int(rng.integers(1, 60))
        texts.append(f"doc {i}: " + " ".join(words[int(j)] for j in rng.integers(0, len(words), n)))
    return texts


def write_txt_corpus(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_bytes(text.encode("utf-8"))
    return root


def decoded_split(out: Path, split: str) -> list[str]:
    dataset = TokenDataset(out, split)
    tokenizer = load_tokenizer(str(out / "tokenizer.json"))
    docs = []
    for i in range(dataset.num_docs):
        with_eos = dataset.document(i, with_eos=True)
        assert with_eos[-1] == dataset.eos_id
        assert dataset.eos_id not in with_eos[:-1].tolist()
        docs.append(tokenizer.decode(dataset.document(i).tolist()))
    return docs


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_txt_round_trip(tmp_path: Path) -> None:
    texts = sample_texts()
    src = write_txt_corpus(tmp_path / "corpus", texts)
    out = prepare(str(src), tmp_path / "out", vocab_size=VOCAB, val_fraction=0.3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    keyed = [(f"doc{i:03d}.txt", t) for i, t in enumerate(texts)]
    for split in ("train", "val"):
        expected = [t for key, t in keyed if split_of(key, 0.3) == split]
        assert expected, f"test corpus should populate the {split} split"
        assert decoded_split(out, split) == expected
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= VOCAB
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(texts)
    assert meta["eos_id"] == 0 and meta["eos_token"] == "<|endoftext|>"
    train = TokenDataset(out, "train")
    assert train.tokens.dtype == np.uint16
    assert len(train) == meta["splits"]["train"]["tokens"]
    assert train.doc_starts.dtype == np.int64 and train.doc_starts[0] == 0


def test_jsonl_round_trip_and_empty_docs_skipped(tmp_path: Path) -> None:
    texts = sample_texts()
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"id": i, "content": t}) for i, t in enumerate(texts)]
    lines.insert(3, json.dumps({"id": -1, "content": ""}))  # empty document: skipped
    lines.insert(5, "")  # blank line: ignored
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = prepare(str(path), tmp_path / "out", vocab_size=VOCAB, text_field="content", val_fraction=0.3)
    got = decoded_split(out, "train") + decoded_split(out, "val")
    assert sorted(got) == sorted(texts)
    assert read_meta(out)["skipped_empty_docs"] == 1


def test_parquet_source(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = sample_texts()
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "d.parquet")
    out = prepare(str(tmp_path / "d.parquet"), tmp_path / "out", vocab_size=VOCAB, val_fraction=0.3)
    assert sorted(decoded_split(out, "train") + decoded_split(out, "val")) == sorted(texts)


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    src = write_txt_corpus(tmp_path / "corpus", sample_texts())
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".train.bin.tmp-999999999"  # no such pid
    stale.write_bytes(b"half written")
    prepare(str(src), out, vocab_size=VOCAB)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    src = write_txt_corpus(tmp_path / "corpus", sample_texts() * 3)
    a = prepare(str(src), tmp_path / "a", vocab_size=VOCAB, val_fraction=0.2)
    b = prepare(str(src), tmp_path / "b", vocab_size=VOCAB, val_fraction=0.2)
    assert file_bytes(a) == file_bytes(b)
    before = file_bytes(a)
    prepare(
        str(src), a, vocab_size=VOCAB, val_fraction=0.2
    )  # re-run in place: same bytes, no temp files left
    assert file_bytes(a) == before


def test_glob_source_and_max_docs(tmp_path: Path) -> None:
    texts = sample_texts()
    src = write_txt_corpus(tmp_path / "corpus", texts)
    out = prepare(str(src / "doc00*.txt"), tmp_path / "out", vocab_size=VOCAB, val_fraction=0.0, max_docs=5)
    assert decoded_split(out, "train") == texts[:5]
    assert TokenDataset(out, "val").num_docs == 0 and len(TokenDataset(out, "val")) == 0


def test_transformers_autotokenizer_loads_output(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    texts = sample_texts()
    out = prepare(str(write_txt_corpus(tmp_path / "c", texts)), tmp_path / "out", vocab_size=VOCAB)
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == read_meta(out)["eos_id"]
    train = TokenDataset(out, "train")
    ids = train.document(0).tolist()
    assert hf.decode(ids) == load_tokenizer(str(out / "tokenizer.json")).decode(ids)
    assert (
        hf("doc 1: héllo wörld", add_special_tokens=False).input_ids
        == load_tokenizer(str(out)).encode_batch(["doc 1: héllo wörld"])[0]
    )


def test_existing_tokenizer_options(tmp_path: Path) -> None:
    texts = sample_texts()
    src = write_txt_corpus(tmp_path / "c", texts)
    first = prepare(str(src), tmp_path / "first", vocab_size=VOCAB, val_fraction=0.3)
    # tokenizer.json file and AutoTokenizer directory reproduce the token streams of the trained tokenizer
    for spec in (str(first / "tokenizer.json"), str(first)):
        out = prepare(str(src), tmp_path / f"again-{Path(spec).name}", tokenizer=spec, val_fraction=0.3)
        assert (out / "train.bin").read_bytes() == (first / "train.bin").read_bytes()
        assert (out / "val.idx.npy").read_bytes() == (first / "val.idx.npy").read_bytes()
        assert read_meta(out)["tokenizer"] == spec
    with pytest.raises(FileNotFoundError, match="tokenizer path"):
        prepare(str(src), tmp_path / "x", tokenizer=str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(ValueError, match="eos-token"):
        prepare(str(src), tmp_path / "y", tokenizer=str(first / "tokenizer.json"), eos_token="<nope>")


def test_uint32_dtype_for_big_vocab() -> None:
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(ValueError, match="uint32"):
        token_dtype(2**32 + 1)


def test_refuses_different_meta_unless_overwrite(tmp_path: Path) -> None:
    src = write_txt_corpus(tmp_path / "c", sample_texts())
    out = prepare(str(src), tmp_path / "out", vocab_size=VOCAB)
    before = file_bytes(out)
    with pytest.raises(ValueError, match="overwrite"):
        prepare(str(src), out, vocab_size=VOCAB + 50)
    assert file_bytes(out) == before
    (src / "doc000.txt").write_text("changed content", encoding="utf-8")
    with pytest.raises(ValueError, match="different content"):
        prepare(str(src), out, vocab_size=VOCAB)
    assert file_bytes(out) == before  # nothing replaced, no temp files left
    prepare(str(src), out, vocab_size=VOCAB + 50, overwrite=True)
    assert read_meta(out)["config"]["vocab_size"] == VOCAB + 50


def test_failure_leaves_no_partial_files(tmp_path: Path) -> None:
    src = write_txt_corpus(tmp_path / "c", sample_texts())
    first = prepare(str(src), tmp_path / "first", vocab_size=VOCAB)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text"}\n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="text"):
        prepare(str(bad), out, tokenizer=str(first / "tokenizer.json"))  # fails while writing shards
    assert not out.exists() or list(out.iterdir()) == []


def test_hf_dataset_source_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    texts = sample_texts()
    calls = []

    def fake_load_dataset(name, config=None, *, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        ds = datasets.Dataset.from_dict({"story": texts, "label": list(range(len(texts)))})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = prepare(
        "someone/tiny-stories", tmp_path / "a", vocab_size=VOCAB, text_field="story", hf_split="train"
    )
    assert calls == [("someone/tiny-stories", None, "train", False)]
    assert sorted(decoded_split(out, "train") + decoded_split(out, "val")) == sorted(texts)
    meta = read_meta(out)
    assert meta["source_info"]["kind"] == "hf" and meta["config"]["hf_split"] == "train"
    streamed = prepare(
        "someone/tiny-stories",
        tmp_path / "b",
        vocab_size=VOCAB,
        text_field="story",
        streaming=True,
        hf_config="default",
    )
    assert calls[-1] == ("someone/tiny-stories", "default", "train", True)
    assert (streamed / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    with pytest.raises(ValueError, match=r"'text'.*story"):
        prepare("someone/tiny-stories", tmp_path / "c", vocab_size=VOCAB)


def test_stdlib_source_small(tmp_path: Path) -> None:
    out = prepare("stdlib", tmp_path / "std", vocab_size=600, max_docs=12, val_fraction=0.2)
    meta = read_meta(out)
    assert meta["source_info"]["kind"] == "stdlib"
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 12
    from kvshift.data.sources import StdlibSource, iter_documents

    docs = list(iter_documents(StdlibSource(), max_docs=12))
    assert [d.key for d in docs] == sorted(d.key for d in docs)
    assert not any("site-packages" in d.key for d in docs)
    expected = [d.text for d in docs if split_of(d.key, 0.2) == "train"]
    assert decoded_split(out, "train") == expected


def test_max_bytes(tmp_path: Path) -> None:
    texts = sample_texts()
    src = write_txt_corpus(tmp_path / "c", texts)
    out = prepare(str(src), tmp_path / "o", vocab_size=VOCAB, val_fraction=0.0, max_bytes=60)
    sizes = np.cumsum([len(t.encode()) for t in texts])
    n = int(np.searchsorted(sizes, 60)) + 1  # documents up to and including the one crossing the limit
    assert decoded_split(out, "train") == texts[:n]


def test_cli_prepare_success_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    src = write_txt_corpus(tmp_path / "c", sample_texts())
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(
        ["--source", str(src), "--out", str(tmp_path / "o"), "--vocab-size", str(VOCAB), "--split-val", "0.1"]
    )
    assert run_prepare(args) == 0
    assert read_meta(tmp_path / "o")["config"]["val_fraction"] == 0.1
    capsys.readouterr()
    assert main(["--source", str(tmp_path / "nope" / "*.txt"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "no files match" in err
    assert main(["--source", str(src), "--out", str(tmp_path / "o"), "--vocab-size", "1000"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_main_cli_data_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kvshift data prepare` through the package CLI (skipped if the main CLI is not there)."""
    kvshift_cli = pytest.importorskip("kvshift.cli")
    src = write_txt_corpus(tmp_path / "c", sample_texts())
    argv = ["data", "prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--vocab-size", str(VOCAB)]
    assert kvshift_cli.main(argv) == 0
    assert read_meta(tmp_path / "o")["splits"]["train"]["docs"] > 0
    assert kvshift_cli.main(["data", "prepare", "--source", "", "--out", str(tmp_path / "x")]) == 2
    assert "empty --source" in capsys.readouterr().err
