"""An in-memory byte-level corpus (no preparation, no tokenizer): the data of the `tiny` recipe and smoke tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

__all__ = ["ByteCorpus", "stdlib_byte_corpus"]


class ByteCorpus:
    """Documents as raw UTF-8 bytes (ids 0..255) each followed by EOS (id 256); duck-types ``TokenDataset``."""

    vocab_size = 257
    eos_id = 256

    def __init__(self, documents: list[bytes], split: str = "train", name: str = "bytes") -> None:
        docs = [d for d in documents if d]
        if not docs:
            raise ValueError("ByteCorpus needs at least one non-empty document")
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
        for start, d in zip(self.doc_starts, docs):
            self.tokens[start:start + len(d)] = np.frombuffer(d, dtype=np.uint8)
            self.tokens[start + len(d)] = self.eos_id
        self.split = split
        self.data_dir = Path(f"<{name}>")
        text_bytes = int(sum(len(d) for d in docs))
        self.meta = {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "tokenizer": "bytes",
                     "splits": {split: {"docs": len(docs), "tokens": len(self.tokens), "text_bytes": text_bytes}}}

    def __len__(self) -> int:
        return len(self.tokens)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: 1 for a byte, 0 for EOS."""
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eos_id] = 0
        return out

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)


def stdlib_byte_corpus(split: str = "train", max_files: int = 60, val_files: int = 6) -> ByteCorpus:
    """The first ``max_files`` (train) or the next ``val_files`` (val) stdlib modules, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python standard library sources found under {root}")
    chosen = files[:max_files] if split == "train" else files[max_files:max_files + val_files]
    return ByteCorpus([p.read_bytes() for p in chosen], split=split, name=f"stdlib-bytes/{split}")
