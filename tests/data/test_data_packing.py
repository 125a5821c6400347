"""Tests of packed batches: document boundaries, labels, determinism, rank sharding, resume and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvshift.data import (
    IGNORE_INDEX,
    PackedBatches,
    TokenDataset,
    documents_in_row,
    position_ids_to_cu_seqlens,
    prepare,
    val_batches,
)

SEQ = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~90 documents of very different lengths (some shorter than a row, some spanning several rows)."""
    root = tmp_path_factory.mktemp("packing")
    src = root / "corpus"
    src.mkdir()
    rng = np.random.default_rng(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "\n", "42", "é"]
    for i in range(90):
        n = int(rng.choice([1, 3, 8, 40, 120]))
        text = f"doc{i} " + " ".join(words[int(j)] for j in rng.integers(0, len(words), n))
        (src / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return prepare(str(src), root / "out", vocab_size=300, val_fraction=0.2, progress=False)


@pytest.fixture(scope="module")
def train(data_dir: Path) -> TokenDataset:
    return TokenDataset(data_dir, "train")


def take(iterator, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(iterator)
    return [next(it) for _ in range(n)]


def check_row(dataset: TokenDataset, start: int, row: dict[str, torch.Tensor]) -> None:
    """Row = tokens[start:start+T], labels the next tokens (ignored at doc starts), positions reset at docs."""
    tokens = np.asarray(dataset.tokens, dtype=np.int64)
    starts = set(dataset.doc_starts.tolist())
    T = row["input_ids"].shape[0]
    assert row["input_ids"].tolist() == tokens[start : start + T].tolist()
    for t in range(T):
        nxt = start + t + 1
        assert row["labels"][t].item() == (IGNORE_INDEX if nxt in starts else tokens[nxt])
        assert (row["position_ids"][t].item() == 0) == (t == 0 or start + t in starts)
    doc_of = np.searchsorted(dataset.doc_starts, np.arange(start, start + T), side="right") - 1
    for a, b in documents_in_row(row["position_ids"]):
        assert len(set(doc_of[a:b].tolist())) == 1  # every span lies inside one document
        assert row["position_ids"][a:b].tolist() == list(range(b - a))
        eos_at = [i for i in range(a, b) if row["input_ids"][i].item() == dataset.eos_id]
        assert eos_at in ([], [b - 1])  # an EOS can only close a span


def test_dataset_view(train: TokenDataset, data_dir: Path) -> None:
    assert train.tokens.dtype == np.uint16
    assert train.num_docs > 10 and train.vocab_size <= 300 and train.eos_id == 0
    assert train.tokens[-1] == train.eos_id
    ends = np.append(train.doc_starts[1:], len(train)) - 1
    assert (np.asarray(train.tokens)[ends] == train.eos_id).all()
    assert "TokenDataset" in repr(train)


def test_document_boundaries_survive_packing(train: TokenDataset) -> None:
    batches = PackedBatches(train, 4, SEQ, seed=3)
    restarts = 0
    for step in range(6):
        batch = batches.batch_at(step)
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        for key in batch:
            assert batch[key].shape == (4, SEQ) and batch[key].dtype == torch.int64
        for start, *row in zip(
            batches.row_starts(step),
            *(batch[k] for k in ("input_ids", "labels", "position_ids")),
            strict=True,
        ):
            check_row(train, int(start), dict(zip(("input_ids", "labels", "position_ids"), row, strict=True)))
            restarts += int((row[2][1:] == 0).sum())
    assert restarts > 5  # rows really do contain several documents


def test_epoch_covers_every_chunk_once(train: TokenDataset) -> None:
    batches = PackedBatches(train, 1, SEQ, seed=0)
    n = batches.num_chunks
    offset, _ = batches.epoch_plan(0)
    starts = np.concatenate([batches.row_starts(s) for s in range(n)])
    assert sorted(starts.tolist()) == [offset + k * SEQ for k in range(n)]
    assert starts.max() + SEQ + 1 <= len(train)
    # later epochs use another offset/order, still within bounds
    later = np.concatenate([batches.row_starts(s) for s in range(n, 3 * n)])
    assert later.max() + SEQ + 1 <= len(train) and later.min() >= 0


def test_deterministic_given_seed(train: TokenDataset) -> None:
    a = take(PackedBatches(train, 3, SEQ, seed=7), 4)
    b = take(PackedBatches(train, 3, SEQ, seed=7), 4)
    c = take(PackedBatches(train, 3, SEQ, seed=8), 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding_matches_single_process(train: TokenDataset, world_size: int) -> None:
    B = 2
    steps = 7  # enough to cross an epoch boundary with a small dataset
    single = take(PackedBatches(train, B * world_size, SEQ, seed=11), steps)
    ranks = [
        take(PackedBatches(train, B, SEQ, seed=11, rank=r, world_size=world_size), steps)
        for r in range(world_size)
    ]
    for step in range(steps):
        for key in ("input_ids", "labels", "position_ids"):
            merged = torch.cat([ranks[r][step][key] for r in range(world_size)])
            assert torch.equal(merged, single[step][key])


def test_resume_continues_exactly(train: TokenDataset) -> None:
    reference = take(PackedBatches(train, 2, SEQ, seed=5), 12)
    first = PackedBatches(train, 2, SEQ, seed=5)
    take(first, 5)
    state = first.state_dict()
    assert state["step"] == 5
    resumed = PackedBatches(train, 2, SEQ, seed=5)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 7), reference[5:], strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    started = take(PackedBatches(train, 2, SEQ, seed=5, start_step=9), 3)
    assert all(
        torch.equal(g["input_ids"], w["input_ids"]) for g, w in zip(started, reference[9:], strict=True)
    )
    # resuming a 2-rank run in 1 process with the same global batch is allowed, a different seed is not
    two_rank = PackedBatches(train, 1, SEQ, seed=5, rank=1, world_size=2)
    two_rank.load_state_dict(state)
    assert torch.equal(next(iter(two_rank))["input_ids"], reference[5]["input_ids"][1:])
    with pytest.raises(ValueError, match="seed"):
        PackedBatches(train, 2, SEQ, seed=6).load_state_dict(state)


def test_packed_batches_argument_errors(train: TokenDataset) -> None:
    with pytest.raises(ValueError, match="rank"):
        PackedBatches(train, 2, SEQ, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="tokens"):
        PackedBatches(train, 2, len(train), seed=0)


def test_val_batches_walk_from_start(data_dir: Path) -> None:
    val = TokenDataset(data_dir, "val")
    batches = list(val_batches(val, 2, 8))
    n_chunks = (len(val) - 1) // 8
    assert sum(b["input_ids"].shape[0] for b in batches) == n_chunks
    flat = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    assert flat.tolist() == np.asarray(val.tokens[: n_chunks * 8], dtype=np.int64).tolist()
    for i, b in enumerate(batches[:3]):
        for r in range(b["input_ids"].shape[0]):
            check_row(val, (2 * i + r) * 8, {k: v[r] for k, v in b.items()})
    assert len(list(val_batches(val, 2, 8, max_batches=2))) == 2
    assert all(b["input_ids"].shape[0] == 2 for b in val_batches(val, 2, 8, drop_last=True))
    # ranks together cover the single-process batches
    r0 = [b["input_ids"][0].tolist() for b in val_batches(val, 1, 8, rank=0, world_size=2)]
    r1 = [b["input_ids"][0].tolist() for b in val_batches(val, 1, 8, rank=1, world_size=2)]
    interleaved = [row for pair in zip(r0, r1 + [None], strict=False) for row in pair if row is not None]
    assert interleaved == [row.tolist() for b in batches for row in b["input_ids"]]


def test_documents_in_row_and_cu_seqlens() -> None:
    row = torch.tensor([5, 6, 0, 1, 2, 0, 0, 1])
    assert documents_in_row(row) == [(0, 2), (2, 5), (5, 6), (6, 8)]
    assert documents_in_row([0, 1, 2]) == [(0, 3)]
    assert position_ids_to_cu_seqlens(row).tolist() == [0, 2, 5, 6, 8]
    batch = torch.tensor([[0, 1, 0, 1], [3, 4, 5, 0]])
    cu = position_ids_to_cu_seqlens(batch)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 4, 7, 8]
