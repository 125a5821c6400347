"""Read prepared shards and pack them into fixed-length, document-aware training and evaluation batches.

Rows are windows of ``seq_len + 1`` consecutive tokens of a split's stream: ``input_ids = window[:-1]``,
``labels = window[1:]`` (labels are already shifted: ``labels[t]`` is the target for ``input_ids[t]``; with a
Hugging Face model pass them as ``shift_labels=`` or compute the cross entropy directly).

Document boundaries: ``position_ids`` count from 0 at the start of every row and restart at 0 at the first
token of every document inside the row. The model resets the KV shift and blocks attention where
``position_ids == 0``. Since attention cannot look back across a boundary, the label of the token just
before a document start (normally that document's predecessor's EOS) would have to be guessed from another
document; it is set to ``-100`` (ignored). The EOS token itself is still a target (end-of-document is learned).

Training order: per epoch, the stream is cut into contiguous chunks at a seeded random offset in
``[0, seq_len)`` and the chunks are visited in a seeded random permutation (``numpy.random.RandomState``,
whose stream numpy keeps stable across versions). Sample ``g`` of the global sample sequence is chunk
``g % num_chunks`` of epoch ``g // num_chunks``; step ``s`` is samples ``[s*G, (s+1)*G)`` with
``G = batch_size * world_size`` and rank ``r`` takes rows ``[r*batch_size, (r+1)*batch_size)`` of it, so the
ranks of a step together see exactly the batch of a single process with batch size ``G``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shards import SPLITS, data_files, read_meta

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


class TokenDataset:
    """One split of a prepared directory, memory-mapped.

    ``tokens``: 1-D ``numpy.memmap`` of token ids; ``doc_starts``: ``int64`` start offset of each document
    (each document ends with ``eos_id``); ``vocab_size``, ``eos_id``, ``meta`` from meta.json.
    """

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta: dict[str, Any] = read_meta(self.data_dir)
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.eos_id: int = int(self.meta["eos_id"])
        self.dtype = np.dtype(self.meta["dtype"])
        info = self.meta["splits"][split]
        tokens_file, index_file = data_files(split)
        tokens_path = self.data_dir / tokens_file
        expected = int(info["tokens"]) * self.dtype.itemsize
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{tokens_path} has {actual} bytes but meta.json says {info['tokens']} {self.dtype.name} tokens "
                f"({expected} bytes); the directory is corrupt or mixed with another preparation"
            )
        if expected == 0:  # numpy cannot memory-map an empty file
            self.tokens: np.ndarray = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(tokens_path, dtype=self.dtype, mode="r")
        self.doc_starts: np.ndarray = np.load(self.data_dir / index_file).astype(np.int64, copy=False)
        if len(self.doc_starts) != int(info["docs"]):
            raise ValueError(
                f"{self.data_dir / index_file} does not match meta.json ({info['docs']} documents)"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def doc_keys(self) -> list[str] | None:
        """Names of the documents (recorded for the val split by ``kvshift data prepare``), or None."""
        keys = self.meta["splits"][self.split].get("doc_keys")
        return list(keys) if keys is not None and len(keys) == self.num_docs else None

    def token_byte_lengths(self) -> np.ndarray | None:
        """UTF-8 bytes each token id stands for (0 for special tokens), for exact bits per byte; None when
        the tokenizer is not byte-level (bits per byte then use the split's average bytes per token).
        Read from tokenizer.json once per dataset (every evaluation asks)."""
        if not hasattr(self, "_byte_lengths"):
            from .tokenizer import byte_level_token_lengths

            self._byte_lengths = byte_level_token_lengths(self.data_dir / "tokenizer.json", self.vocab_size)
        return self._byte_lengths

    def document(self, index: int, *, with_eos: bool = False) -> np.ndarray:
        """Token ids of document ``index`` (without its trailing EOS unless ``with_eos``)."""
        start = int(self.doc_starts[index])
        end = int(self.doc_starts[index + 1]) if index + 1 < self.num_docs else len(self.tokens)
        return np.asarray(self.tokens[start : end if with_eos else end - 1])

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.data_dir)!r}, split={self.split!r}, tokens={len(self)}, "
            f"docs={self.num_docs}, vocab_size={self.vocab_size})"
        )


def build_rows(dataset: TokenDataset, starts: Sequence[int] | np.ndarray, seq_len: int) -> Batch:
    """Batch of the windows ``tokens[s : s + seq_len + 1]`` for each ``s`` in ``starts``."""
    starts = np.asarray(starts, dtype=np.int64)
    rows = len(starts)
    windows = np.empty((rows, seq_len + 1), dtype=np.int64)
    for i, start in enumerate(starts):
        windows[i] = dataset.tokens[start : start + seq_len + 1]
    # Stream index of every window token; the document of a token is the last doc start <= its index.
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    doc_starts = dataset.doc_starts
    doc = np.searchsorted(doc_starts, index, side="right") - 1
    segment_start = np.maximum(doc_starts[doc], starts[:, None])
    positions = index - segment_start
    is_doc_start = doc_starts[doc] == index
    labels = windows[:, 1:].copy()
    labels[is_doc_start[:, 1:]] = IGNORE_INDEX
    return {
        "input_ids": torch.from_numpy(windows[:, :-1].copy()),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions[:, :-1].copy()),
    }


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"kvshift-packing:{seed}:{epoch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class PackedBatches:
    """Infinite, deterministic stream of packed training batches for one rank (see the module docstring).

    Each batch is a dict of ``[batch_size, seq_len]`` int64 tensors ``input_ids``, ``labels`` and
    ``position_ids``. ``state_dict()`` / ``load_state_dict()`` save and restore the step so a resumed run
    continues with exactly the batches that would have come next; the global batch size (not the world size)
    must stay the same across a resume.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        n = len(dataset)
        if n < seq_len + 1:
            raise ValueError(
                f"{dataset.split} split of {dataset.data_dir} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.step = start_step
        # A random offset in [0, seq_len) is used when the stream has room for it (n >= 2 * seq_len).
        self.random_offset = n >= 2 * seq_len
        self.num_chunks = n // seq_len - 1 if self.random_offset else (n - 1) // seq_len
        self._plan_cache: dict[int, tuple[int, np.ndarray]] = {}

    def epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, chunk permutation) of ``epoch``."""
        plan = self._plan_cache.get(epoch)
        if plan is None:
            rng = np.random.RandomState(_epoch_seed(self.seed, epoch))
            offset = int(rng.randint(self.seq_len)) if self.random_offset else 0
            plan = (offset, rng.permutation(self.num_chunks).astype(np.int64))
            if len(self._plan_cache) >= 2:
                self._plan_cache.pop(min(self._plan_cache))
            self._plan_cache[epoch] = plan
        return plan

    def row_starts(self, step: int) -> np.ndarray:
        """Stream offsets of this rank's rows at ``step``."""
        first = step * self.global_batch_size + self.rank * self.batch_size
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i, sample in enumerate(range(first, first + self.batch_size)):
            epoch, position = divmod(sample, self.num_chunks)
            offset, permutation = self.epoch_plan(epoch)
            starts[i] = offset + int(permutation[position]) * self.seq_len
        return starts

    def batch_at(self, step: int) -> Batch:
        """This rank's batch at ``step`` (random access; does not move the iterator)."""
        return build_rows(self.dataset, self.row_starts(step), self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_tokens": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (
            ("seed", self.seed),
            ("seq_len", self.seq_len),
            ("global_batch_size", self.global_batch_size),
            ("num_tokens", len(self.dataset)),
        ):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume: saved {key}={state[key]} but this iterator has {key}={mine}"
                )
        self.step = int(state["step"])


def val_batches(
    dataset: TokenDataset,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Evaluation batches walking the split from its start in contiguous chunks ``k * seq_len``.

    Global batch ``b`` holds chunks ``[b*G, (b+1)*G)`` (``G = batch_size * world_size``), rank ``r`` its rows
    ``[r*batch_size, (r+1)*batch_size)``. At most ``max_batches`` (global) batches. The last one may be
    smaller (a rank whose share is empty yields nothing for it) unless ``drop_last``; use ``drop_last``
    when every rank must run the same number of steps.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    num_chunks = max(len(dataset) - 1, 0) // seq_len
    global_batch = batch_size * world_size
    num_batches = num_chunks // global_batch if drop_last else -(-num_chunks // global_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        first = b * global_batch + rank * batch_size
        chunks = np.arange(first, min(first + batch_size, num_chunks), dtype=np.int64)
        if len(chunks) == 0:
            continue
        yield build_rows(dataset, chunks * seq_len, seq_len)


def _as_numpy(position_ids: Any) -> np.ndarray:
    if isinstance(position_ids, torch.Tensor):
        return position_ids.detach().cpu().numpy()
    return np.asarray(position_ids)


def documents_in_row(position_ids_row: Any) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` half-open spans of the documents in one row (a new one where position == 0)."""
    row = _as_numpy(position_ids_row)
    if row.ndim != 1:
        raise ValueError(f"expected a 1-D position_ids row, got shape {tuple(row.shape)}")
    if len(row) == 0:
        return []
    starts = np.flatnonzero(row == 0)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], len(row))
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def position_ids_to_cu_seqlens(position_ids: Any) -> torch.Tensor:
    """Cumulative sequence lengths (int32, starting with 0) for variable-length attention kernels.

    Accepts one row ``[T]`` or a batch ``[B, T]``; a batch is treated as its rows concatenated (row starts
    are always boundaries), as flash-attention's varlen functions expect.
    """
    array = _as_numpy(position_ids)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"expected position_ids of shape [T] or [B, T], got {tuple(array.shape)}")
    bounds = [0]
    for r, row in enumerate(array):
        offset = r * array.shape[1]
        bounds.extend(offset + end for _, end in documents_in_row(row))
    return torch.tensor(bounds, dtype=torch.int32)


def validation_rows(dataset: TokenDataset, seq_len: int, max_tokens: int = 0, *, seed: int = 0
                    ) -> list[tuple[int, int]]:
    """``[(start, length), ...]`` rows of a validation pass over ``dataset``.

    ``max_tokens == 0`` (or at least the split's size): the whole split in contiguous rows, the last one
    shorter, so every token after the first is scored exactly once and every document contributes.
    Otherwise a fixed sample of about ``max_tokens`` tokens in rows of ``seq_len`` drawn from *every*
    document: each document gets a share of the rows proportional to its length (at least one while there
    are rows for all), at seeded random offsets inside it (``numpy.random.RandomState(seed)``).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (0 = the whole split), got {max_tokens}")
    n = len(dataset)
    if n < 2:
        return []
    if max_tokens == 0 or max_tokens >= n - 1:
        return [(s, min(seq_len, n - 1 - s)) for s in range(0, n - 1, seq_len)]
    T = min(seq_len, n - 1)
    rows = max(1, max_tokens // T)
    starts = dataset.doc_starts
    lengths = np.diff(np.append(starts, n)).astype(np.float64)
    share = rows * lengths / lengths.sum()
    count = np.floor(share).astype(np.int64)
    if rows >= len(starts):
        count = np.maximum(count, 1)
    # largest remainders fill up (or, after the minimum of one, the longest documents give back) the total
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while count.sum() < rows:
        count[order[i % len(order)]] += 1
        i += 1
    by_length = np.argsort(-lengths, kind="stable")
    i = 0
    while count.sum() > rows:  # only after the minimum of one: some document has more than one row
        d = by_length[i % len(by_length)]
        if count[d] > 1:
            count[d] -= 1
        i += 1
    rng = np.random.RandomState(seed)
    out = []
    for d in range(len(starts)):
        if count[d] == 0:
            continue
        lo = int(starts[d])
        hi = max(lo, min(int(starts[d] + lengths[d]) - T, n - 1 - T))  # last start still inside the doc
        out.extend((int(s), T) for s in np.sort(rng.randint(lo, hi + 1, size=int(count[d]))))
    return out


def validation_batches(dataset: TokenDataset, batch_size: int, rows: list[tuple[int, int]], *,
                       rank: int = 0, world_size: int = 1, equal_counts: bool = False) -> Iterator[Batch]:
    """Batches of ``rows`` (from :func:`validation_rows`); rows of equal length are batched together, and
    rank ``r`` of ``world_size`` takes every ``world_size``-th batch.

    ``equal_counts=True`` gives every rank the same number of batches: a rank left short gets filler
    batches (a copy of the first batch with every label ``-100``, so it scores nothing). Sharded models
    (FSDP) need it: every forward pass gathers parameters collectively, so a rank that runs one forward
    fewer than the others leaves them waiting for ever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    by_len: dict[int, list[int]] = {}
    for start, length in rows:
        by_len.setdefault(length, []).append(start)
    groups = [(length, by_len[length][i:i + batch_size])
              for length in sorted(by_len, reverse=True) for i in range(0, len(by_len[length]), batch_size)]
    mine = groups[rank::world_size]
    for length, starts in mine:
        yield build_rows(dataset, starts, length)
    if equal_counts and groups:
        for _ in range(-(-len(groups) // world_size) - len(mine)):
            filler = build_rows(dataset, groups[0][1], groups[0][0])
            filler["labels"] = torch.full_like(filler["labels"], -100)
            yield filler


def documents_covered(dataset: TokenDataset, rows: list[tuple[int, int]]) -> list[int]:
    """Indices of the documents with at least one scored target in ``rows`` (a row starting at ``s`` scores
    stream tokens ``s + 1 .. s + length``; a document's first token is never a target)."""
    starts = dataset.doc_starts
    ends = np.append(starts[1:], len(dataset))
    covered = np.zeros(len(starts), dtype=bool)
    for start, length in rows:
        lo, hi = start + 1, start + length  # inclusive target range
        first = max(int(np.searchsorted(starts, lo, side="right")) - 1, 0)
        last = int(np.searchsorted(starts, hi, side="right")) - 1
        for d in range(first, last + 1):
            covered[d] |= max(lo, int(starts[d]) + 1) <= min(hi, int(ends[d]) - 1)
    return np.flatnonzero(covered).tolist()
