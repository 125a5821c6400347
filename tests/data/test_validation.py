"""Validation covers every val document: the whole split by default, or a seeded sample from every document."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kvshift.data import TokenDataset, prepare
from kvshift.data.packing import documents_covered, validation_batches, validation_rows

SEQ = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Val documents of very different lengths, the first few long (as the stdlib's codec tables are)."""
    root = tmp_path_factory.mktemp("val")
    src = root / "corpus"
    src.mkdir()
    rng = np.random.default_rng(2)
    words = ["alpha", "beta", "gamma", "delta", "\n", "7", "ü"]
    for i in range(120):
        n = int(rng.choice([2, 10, 60, 400]))
        (src / f"{i:03d}.txt").write_text(f"doc{i} " + " ".join(words[int(j)] for j in rng.integers(0, 7, n)))
    return prepare(str(src), root / "out", vocab_size=300, val_fraction=0.3, progress=False)


@pytest.fixture(scope="module")
def val(data_dir) -> TokenDataset:
    return TokenDataset(data_dir, "val")


def _targets(ds, rows):
    """Stream indices of every scored target, with repeats."""
    return [t for start, length in rows for t in range(start + 1, start + length + 1)]


def test_whole_split_scores_every_token_once_and_every_document(val):
    rows = validation_rows(val, SEQ)
    targets = _targets(val, rows)
    assert sorted(targets) == list(range(1, len(val)))  # each token after the first, exactly once
    assert documents_covered(val, rows) == [d for d in range(val.num_docs)
                                            if (np.append(val.doc_starts[1:], len(val)) - val.doc_starts)[d] > 1]
    # the batches hold exactly those rows (the last one shorter) and label every non-boundary target
    n_labels = sum(int((b["labels"] != -100).sum()) for b in validation_batches(val, 4, rows))
    assert n_labels == len(val) - val.num_docs  # every token but each document's first


def test_sample_draws_from_every_document_and_is_seeded(val):
    budget = 50 * SEQ
    assert val.num_docs <= 50 and budget < len(val) // 2  # a real sample, yet a row for every document
    rows = validation_rows(val, SEQ, budget, seed=3)
    assert len(rows) == budget // SEQ and all(length == SEQ for _, length in rows)
    assert documents_covered(val, rows) == list(range(val.num_docs))
    assert rows == validation_rows(val, SEQ, budget, seed=3)
    assert rows != validation_rows(val, SEQ, budget, seed=4)
    starts = val.doc_starts
    for d in range(val.num_docs):  # every document has a row starting inside it
        end = starts[d + 1] if d + 1 < val.num_docs else len(val)
        assert any(starts[d] <= s < end for s, _ in rows), d


def test_sample_budget_larger_than_split_is_the_whole_split(val):
    assert validation_rows(val, SEQ, 10 * len(val)) == validation_rows(val, SEQ)
    with pytest.raises(ValueError, match="max_tokens"):
        validation_rows(val, SEQ, -1)


def test_val_doc_names_recorded_and_bytes_per_token_exact(data_dir, val):
    meta = json.loads((data_dir / "meta.json").read_text())
    keys = val.doc_keys()
    assert keys is not None and len(keys) == val.num_docs and all(k.endswith(".txt") for k in keys)
    assert "doc_keys" not in meta["splits"]["train"]
    lengths = val.token_byte_lengths()
    assert int(lengths[np.asarray(val.tokens, dtype=np.int64)].sum()) == meta["splits"]["val"]["text_bytes"]


def test_trainer_validates_on_the_whole_split_and_records_it(data_dir, tmp_path):
    from kvshift.train.config import apply_overrides
    from kvshift.train.loop import train
    from kvshift.train.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny"), [
        "data.source=prepared", f"data.path={data_dir}", "data.seq_len=32", "steps=2", "eval_every=1",
        "data.val_curve_tokens=64", "tensorboard=false", "progress=false"])
    summary = train(cfg, tmp_path / "run")
    val = TokenDataset(data_dir, "val")
    assert summary["val_tokens"] == len(val) - val.num_docs
    assert summary["val_docs"] == summary["validation"]["split_docs"] == val.num_docs
    assert summary["validation"]["mode"] == "whole split"
    assert sorted(summary["validation"]["doc_keys"]) == sorted(val.doc_keys())
    # bits per byte from the targets' own bytes
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2) * summary["val_tokens"]
                                               / summary["val_bytes"])
    curve = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in curve if "val_loss" in r]
    assert [r["val_mode"] for r in evals] == ["sample", "whole split"]


def test_deprecated_val_batches_becomes_a_sample_from_every_document():
    from kvshift.train.config import apply_overrides
    from kvshift.train.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny"), ["data.val_batches=2", "data.val_batch_size=4", "data.seq_len=32"])
    assert cfg.validation_budget() == 2 * 4 * 32
    with pytest.raises(ValueError, match="data.val_tokens"):
        apply_overrides(get_recipe("tiny"), ["data.val_tokens=-1"])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_equal_counts_gives_every_rank_as_many_batches_and_scores_the_same(val, world_size):
    rows = validation_rows(val, SEQ)
    # a batch size that leaves the batches uneven: without fillers the ranks run different numbers of forwards
    bs = next(b for b in range(3, 12) if len(list(validation_batches(val, b, rows))) % world_size)
    single = list(validation_batches(val, bs, rows))
    plain = [list(validation_batches(val, bs, rows, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(b) for b in plain}) > 1
    even = [list(validation_batches(val, bs, rows, rank=r, world_size=world_size, equal_counts=True))
            for r in range(world_size)]
    assert len({len(b) for b in even}) == 1 and len(even[0]) == -(-len(single) // world_size)
    for real, padded in zip(plain, even):  # a rank's own batches first, unchanged, then fillers scoring nothing
        for a, b in zip(real, padded):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert all(bool((f["labels"] == -100).all()) for f in padded[len(real):])
    labelled = sum(int((b["labels"] != -100).sum()) for rank in even for b in rank)
    assert labelled == sum(int((b["labels"] != -100).sum()) for b in single)


def test_validation_batches_rejects_a_rank_outside_the_world(val):
    with pytest.raises(ValueError, match="rank"):
        list(validation_batches(val, 4, validation_rows(val, SEQ), rank=2, world_size=2))
