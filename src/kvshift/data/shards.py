"""Prepare tokenized, memory-mappable train/val shards (train.bin, val.bin, *.idx.npy, meta.json) from a text source.

Layout of a prepared directory ``DIR``:

* ``DIR/{split}.bin``: flat token stream of the split (``uint16`` if the vocabulary has at most 65535 ids,
  else ``uint32``), every document followed by the EOS token; open it with ``numpy.memmap``.
* ``DIR/{split}.idx.npy``: ``int64`` start offset of every document in the stream (document ``i`` spans
  ``starts[i]:starts[i+1]`` or up to the end, its last token being the EOS).
* ``DIR/tokenizer.json`` + ``DIR/tokenizer_config.json``: the tokenizer (``AutoTokenizer.from_pretrained(DIR)``).
* ``DIR/meta.json``: vocabulary size, dtype, EOS id, documents/tokens per split, source, tokenizer,
  the preparation settings (``config``), a SHA-256 of the data and tokenizer files and the format ``version``.

Documents are assigned to train/val by a stable hash of their key (the relative path of a file, plus the
line/row number inside jsonl/parquet files), so the split does not depend on document order or count.
All files are written under temporary names in ``DIR`` and moved into place with ``os.replace`` once
everything succeeded (``meta.json`` last), so an interrupted run never leaves half-written shards behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .sources import Document, DocumentStats, TextSource, iter_documents, resolve_source
from .tokenizer import TextTokenizer, load_tokenizer, train_bpe

FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.03
SPLITS = ("train", "val")
META_FILE = "meta.json"
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_BYTES = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when all ids fit (vocab_size <= 65535), else ``uint32``; ValueError beyond uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 65535:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32 token shards")


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment of a document from a BLAKE2b hash of its key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2.0**64 < val_fraction else "train"


def data_files(split: str) -> tuple[str, str]:
    """Names of the token stream and document index files of ``split``."""
    return f"{split}.bin", f"{split}.idx.npy"


def read_meta(out: str | Path) -> dict[str, Any]:
    """Load ``DIR/meta.json`` of a prepared directory (FileNotFoundError if it is not prepared)."""
    path = Path(out) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(out)} is not a prepared data directory (no {META_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty()


def _check_existing(out: Path, config: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Refuse to clobber a directory prepared differently; return its meta (or None)."""
    meta_path = out / META_FILE
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        old_config = old.get("config")
        if old_config != config and not overwrite:
            changed = sorted(
                k for k in set(config) | set(old_config or {}) if (old_config or {}).get(k) != config.get(k)
            )
            raise ValueError(
                f"{out} already holds data prepared with different settings (differs in: "
                f"{', '.join(changed) or 'meta.json'}); use --overwrite (overwrite=True) to replace it"
            )
        return old
    stale = [name for split in SPLITS for name in data_files(split) if (out / name).exists()]
    if stale and not overwrite:
        raise ValueError(
            f"{out} contains {', '.join(stale)} but no {META_FILE}; use --overwrite (overwrite=True) to replace"
        )
    return None


class _SplitWriter:
    """Appends encoded documents (each followed by EOS) to a temporary token file and records doc starts."""

    def __init__(self, handle: BinaryIO, dtype: np.dtype, eos_id: int) -> None:
        self.handle = handle
        self.dtype = dtype
        self.eos_id = eos_id
        self.starts: list[int] = []
        self.tokens = 0
        self.bytes = 0
        self.keys: list[str] = []

    def add(self, ids: list[int], text_bytes: int, key: str | None = None) -> None:
        array = np.empty(len(ids) + 1, dtype=self.dtype)
        array[:-1] = ids
        array[-1] = self.eos_id
        self.handle.write(array.tobytes())
        self.starts.append(self.tokens)
        self.tokens += len(array)
        self.bytes += text_bytes
        if key is not None:
            self.keys.append(key)


def _batched(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= _ENCODE_BATCH_DOCS or size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _sha256_files(paths: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(name.encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _remove_stale_temps(out: Path, names: list[str]) -> None:
    """Delete temporary files of ours left by a killed run (their process no longer exists)."""
    for name in names:
        for path in out.glob(f".{name}.tmp-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except OSError:  # exists but not ours to signal: leave it alone
                pass


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _check_nonempty(stats: DocumentStats, train_docs: int, source: str, val_fraction: float) -> None:
    if stats.documents == 0:
        detail = f" ({stats.skipped_empty} empty or whitespace-only)" if stats.skipped_empty else ""
        raise ValueError(f"source {source!r} has no non-empty documents{detail}")
    if train_docs == 0:
        raise ValueError(
            f"source {source!r}: all {stats.documents} documents fell into the validation split; "
            f"lower the validation fraction (now {val_fraction}) or add documents"
        )


def _train_tokenizer(
    text_source: TextSource,
    *,
    vocab_size: int,
    val_fraction: float,
    max_docs: int | None,
    max_bytes: int | None,
    show: bool,
    source: str,
) -> TextTokenizer:
    """First pass over the source: train the BPE on the train documents only."""
    stats = DocumentStats()
    train_docs = 0

    def train_texts() -> Iterator[str]:
        nonlocal train_docs
        docs = iter_documents(text_source, max_docs=max_docs, max_bytes=max_bytes, stats=stats)
        total = text_source.estimated_length()
        for doc in tqdm(docs, desc="bpe: reading", unit="doc", disable=not show, total=total):
            if split_of(doc.key, val_fraction) == "train":
                train_docs += 1
                yield doc.text

    tokenizer = train_bpe(train_texts(), vocab_size, show_progress=show)
    _check_nonempty(stats, train_docs, source, val_fraction)
    return tokenizer


def _encode_shards(
    text_source: TextSource,
    tok: TextTokenizer,
    temps: dict[str, Path],
    *,
    val_fraction: float,
    max_docs: int | None,
    max_bytes: int | None,
    show: bool,
    source: str,
) -> tuple[dict[str, _SplitWriter], DocumentStats]:
    """Second pass: encode every document into the temporary token streams and document indexes."""
    dtype = token_dtype(tok.vocab_size)
    stats = DocumentStats()
    with ExitStack() as stack:
        writers = {
            split: _SplitWriter(
                stack.enter_context(open(temps[data_files(split)[0]], "wb")), dtype, tok.eos_id
            )
            for split in SPLITS
        }
        docs = iter_documents(text_source, max_docs=max_docs, max_bytes=max_bytes, stats=stats)
        total = text_source.estimated_length()
        bar = stack.enter_context(tqdm(docs, desc="tokenizing", unit="doc", disable=not show, total=total))
        for batch in _batched(iter(bar)):
            for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
                writers[split_of(doc.key, val_fraction)].add(ids, len(doc.text.encode("utf-8")), doc.key)
        for writer in writers.values():
            writer.handle.flush()
            os.fsync(writer.handle.fileno())
    _check_nonempty(stats, len(writers["train"].starts), source, val_fraction)
    for split in SPLITS:
        with open(temps[data_files(split)[1]], "wb") as handle:
            np.save(handle, np.asarray(writers[split].starts, dtype=np.int64))
            handle.flush()
            os.fsync(handle.fileno())
    return writers, stats


def _commit(out: Path, temps: dict[str, Path], names: list[str], old_meta: dict[str, Any] | None) -> None:
    """Move the temporary files into place: old meta.json removed first, new meta.json moved last."""
    (out / META_FILE).unlink(missing_ok=True)
    for name in (old_meta or {}).get("tokenizer_files", []):
        if name not in names and name != META_FILE and "/" not in name:
            (out / name).unlink(missing_ok=True)
    for name in names:
        os.replace(temps[name], out / name)
    os.replace(temps[META_FILE], out / META_FILE)


def prepare(
    source: str,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    streaming: bool = False,
    eos_token: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Path:
    """Tokenize ``source`` into shards in ``out`` and return ``out`` as a Path.

    ``source``: ``"stdlib"``, a local ``.txt``/``.jsonl``/``.parquet`` file, directory or glob, or a Hugging
    Face dataset name (see :func:`kvshift.data.sources.resolve_source`). ``tokenizer``: None trains a
    byte-level BPE of ``vocab_size`` on the train documents only (one extra pass over the source);
    otherwise a tokenizer.json path, an AutoTokenizer directory or hub name (``vocab_size`` is then
    ignored; ``eos_token`` picks its separator token). Empty / whitespace-only documents are skipped.
    ``max_docs`` / ``max_bytes`` limit the documents read (before the split). If ``out`` already holds a
    different preparation, raises ValueError unless ``overwrite``. Deterministic: the same input gives
    byte-identical files. ``progress``: tqdm bars (default: when stderr is a terminal). ``include`` /
    ``exclude``: globs on the relative path or file name of local files (a directory is read recursively).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")

    text_source = resolve_source(
        source, text_field=text_field, hf_split=hf_split, hf_config=hf_config, streaming=streaming,
        include=include, exclude=exclude,
    )
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "text_field": text_field,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer is None else None,
        "eos_token": eos_token,
        "val_fraction": val_fraction,
        "max_docs": max_docs,
        "max_bytes": max_bytes,
    }
    if text_source.kind == "hf":
        config.update(hf_split=hf_split, hf_config=hf_config)
    old_meta = _check_existing(out, config, overwrite) if out.is_dir() else None
    show = _show_progress(progress)
    limits = {"max_docs": max_docs, "max_bytes": max_bytes, "show": show, "source": source}

    if tokenizer is None:
        tok = _train_tokenizer(text_source, vocab_size=vocab_size, val_fraction=val_fraction, **limits)
    else:
        tok = load_tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    names = [name for split in SPLITS for name in data_files(split)] + sorted(tok.files)
    _remove_stale_temps(out, [*names, META_FILE])
    temps = {name: out / f".{name}.tmp-{os.getpid()}" for name in [*names, META_FILE]}
    try:
        writers, stats = _encode_shards(text_source, tok, temps, val_fraction=val_fraction, **limits)
        for name, data in tok.files.items():
            _write_bytes(temps[name], data)
        if val_fraction > 0 and not writers["val"].starts:
            print(
                f"warning: no document of {source!r} fell into the validation split "
                f"(fraction {val_fraction}, {stats.documents} documents); val.bin is empty",
                file=sys.stderr,
            )
        meta = {
            "version": FORMAT_VERSION,
            "source": source,
            "source_info": text_source.describe(),
            "tokenizer": tokenizer if tokenizer is not None else f"trained:{tok.name}",
            "tokenizer_files": sorted(tok.files),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos_token": tok.eos_token,
            "dtype": dtype.name,
            "splits": {
                split: {
                    "tokens_file": data_files(split)[0],
                    "index_file": data_files(split)[1],
                    "docs": len(writers[split].starts),
                    "tokens": writers[split].tokens,
                    "text_bytes": writers[split].bytes,
                    # which documents validation scores, by name (train's list could be huge)
                    **({"doc_keys": writers[split].keys} if split == "val" else {}),
                }
                for split in SPLITS
            },
            "skipped_empty_docs": stats.skipped_empty,
            "content_hash": _sha256_files([(name, temps[name]) for name in names]),
            "config": config,
        }
        if old_meta is not None and old_meta != meta and not overwrite:
            raise ValueError(
                f"{out} already holds data prepared with the same settings but different content "
                f"({old_meta.get('content_hash')} != {meta['content_hash']}; did the source change?); "
                "use --overwrite (overwrite=True) to replace it"
            )
        _write_bytes(temps[META_FILE], (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        _commit(out, temps, names, old_meta)
    finally:
        for path in temps.values():
            path.unlink(missing_ok=True)
    return out
