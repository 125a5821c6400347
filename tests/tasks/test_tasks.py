"""Tests of the synthetic task generators: determinism, invariants, hop-k against brute force, metrics."""

from __future__ import annotations

import pytest
import torch

from kvshift.tasks import (
    IGNORE_INDEX,
    HopKTask,
    InductionTask,
    NGramTask,
    check_invariants,
    error_rate_by_k,
    hop_k_reference,
    hop_k_targets,
    induction_accuracy,
    ngram_accuracy,
    previous_occurrence,
    to_hf_labels,
)

SMALL = {"vocab_size": 512, "seq_len": 128, "pool_size": 64}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _oracle_logits(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits whose argmax is ``targets`` (ignored positions predict id 0)."""
    return torch.nn.functional.one_hot(targets.clamp_min(0), vocab).float()


# ----------------------------------------------------------------------------- induction


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        {"vocab_size": 8000, "seq_len": 512, "pool_size": 512},
        {"vocab_size": 300, "seq_len": 16, "pool_size": 8},
        {"vocab_size": 40, "seq_len": 64, "pool_size": 29},
    ],
)
def test_induction_invariants(cfg: dict) -> None:
    task = InductionTask(**cfg, seed=1)
    batch = task.sample(64 if cfg["seq_len"] < 512 else 16, 3)
    task.check_invariants(batch)
    ids = batch["input_ids"]
    assert ids.shape == (ids.shape[0], cfg["seq_len"]) and ids.dtype == torch.int64
    assert int(ids.min()) >= 11 and int(ids.max()) < cfg["vocab_size"]  # never pad (0) or reserved
    assert batch["eval_mask"].any(dim=1).all()


def test_induction_invariant_by_brute_force() -> None:
    """Every induction target is the successor of the most recent earlier occurrence (pure Python)."""
    batch = InductionTask(vocab_size=100, seq_len=48, pool_size=10, seed=0).sample(40, 5)
    for row, mask in zip(batch["input_ids"].tolist(), batch["eval_mask"].tolist(), strict=True):
        for j, is_ind in enumerate(mask):
            earlier = [i for i in range(j) if row[i] == row[j]]
            if is_ind:
                assert earlier and j + 1 < len(row)
                assert row[j + 1] == row[earlier[-1] + 1]
            if earlier and j > 0 and row[j - 1] != row[j] and not is_ind:
                # a non-induction repeat must be a forced successor (its predecessor was a repeat)
                assert mask[j - 1] or j == len(row) - 1


def test_induction_deterministic_per_seed() -> None:
    task = InductionTask(**SMALL, seed=0)
    a, b, c = task.sample(32, 7), task.sample(32, 7), task.sample(32, 8)
    assert _same(a, b)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert _same(task.sample(8, g1), task.sample(8, g2))
    # The task's own stream: reproducible from the constructor seed, new batches on each call.
    t1, t2 = InductionTask(**SMALL, seed=3), InductionTask(**SMALL, seed=3)
    x1, x2 = t1.sample(8), t2.sample(8)
    assert _same(x1, x2)
    assert not torch.equal(x1["input_ids"], t1.sample(8)["input_ids"])


def test_induction_pool_and_pad() -> None:
    task = InductionTask(vocab_size=8000, seq_len=256, pool_size=32, seed=0)
    batch = task.sample(64, 0)
    ids = batch["input_ids"]
    distinct = [len(set(r)) for r in ids.tolist()]
    assert max(distinct) <= 32 and min(distinct) >= 30  # 256 draws from 32 ids: nearly all used
    assert not (ids == task.pad_id).any()
    # per-sequence pools: rows do not share one fixed pool
    assert len(set(ids.flatten().tolist())) > 32 * 8


def test_induction_label_modes() -> None:
    b_all = InductionTask(**SMALL, seed=0).sample(16, 0)
    task_ind = InductionTask(**SMALL, seed=0, label_mode="induction")
    b_ind = task_ind.sample(16, 0)
    task_ind.check_invariants(b_ind)
    assert torch.equal(b_all["input_ids"], b_ind["input_ids"])
    assert torch.equal(b_all["labels"][:, :-1], b_all["input_ids"][:, 1:])
    assert (b_all["labels"][:, -1] == IGNORE_INDEX).all()
    assert torch.equal(b_ind["labels"] != IGNORE_INDEX, b_ind["eval_mask"])
    hf = to_hf_labels(b_all["labels"])
    assert torch.equal(hf[:, 1:], b_all["input_ids"][:, 1:]) and (hf[:, 0] == IGNORE_INDEX).all()


def test_check_invariants_catches_violations() -> None:
    task = InductionTask(**SMALL, seed=0)
    batch = task.sample(4, 0)
    rows, cols = torch.nonzero(batch["eval_mask"], as_tuple=True)
    bad = {k: v.clone() for k, v in batch.items()}
    r, c = int(rows[0]), int(cols[0])
    bad["input_ids"][r, c + 1] = 11 if bad["input_ids"][r, c + 1] != 11 else 12
    bad["labels"][r, c] = bad["input_ids"][r, c + 1]
    with pytest.raises(AssertionError):
        task.check_invariants(bad)
    padded = {k: v.clone() for k, v in batch.items()}
    padded["input_ids"][0, 5] = 0
    with pytest.raises(AssertionError):
        check_invariants(padded, reserved=11)


def test_induction_accuracy_metric() -> None:
    task = InductionTask(**SMALL, seed=0)
    batch = task.sample(16, 0)
    V = task.vocab_size
    assert induction_accuracy(_oracle_logits(batch["labels"], V), batch) == 1.0
    assert induction_accuracy(_oracle_logits(batch["labels"], V), batch, first_only=True) == 1.0
    copy = _oracle_logits(batch["input_ids"], V)  # predicts the current token: always wrong here
    assert induction_accuracy(copy, batch) == 0.0


def test_previous_occurrence() -> None:
    ids = torch.tensor([[5, 6, 5, 7, 6, 5]])
    assert previous_occurrence(ids).tolist() == [[-1, -1, 0, -1, 1, 2]]


def test_induction_fast() -> None:
    import time

    task = InductionTask(vocab_size=2000, seq_len=128, pool_size=64, seed=0)
    t = time.perf_counter()
    batch = task.sample(20000, 0)
    assert batch["input_ids"].shape == (20000, 128)
    assert time.perf_counter() - t < 20.0  # ~0.5 s on an idle core; generous for shared CI machines


def test_induction_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        InductionTask(vocab_size=50, pool_size=60)
    with pytest.raises(ValueError):
        InductionTask(vocab_size=500, seq_len=3, pool_size=10)
    with pytest.raises(ValueError):
        InductionTask(vocab_size=500, seq_len=30, pool_size=10, label_mode="x")


# ----------------------------------------------------------------------------- n-gram


def test_ngram_table_and_sequences() -> None:
    task = NGramTask(vocab_size=32, num_pairs=200, seq_len=50, seed=0)
    table = task.lookup()
    assert len(table) == 200 and task.table.shape == (200, 3)
    assert int(task.table.min()) >= 1 and int(task.table.max()) < 32
    batch = task.sample(64, 1)
    task.check_invariants(batch)
    ids = batch["input_ids"]
    for row in ids.tolist():
        for i in range(0, 48, 3):
            assert table[(row[i], row[i + 1])] == row[i + 2]
    assert torch.equal(batch["input_ids"][:, :48].reshape(64, 16, 3), task.table[batch["triple_ids"][:, :16]])
    mask = batch["eval_mask"]
    assert mask[:, 1::3][:, :16].all() and mask.sum(dim=1).eq(16).all()
    assert torch.equal(batch["labels"] != IGNORE_INDEX, mask)


def test_ngram_deterministic() -> None:
    a, b = NGramTask(vocab_size=64, seed=3), NGramTask(vocab_size=64, seed=3)
    assert torch.equal(a.table, b.table)
    assert not torch.equal(a.table, NGramTask(vocab_size=64, seed=4).table)
    assert _same(a.sample(16, 0), b.sample(16, 0))
    assert not torch.equal(a.sample(16, 0)["input_ids"], a.sample(16, 1)["input_ids"])
    full = NGramTask(vocab_size=64, seed=3, label_mode="all").sample(4, 0)
    assert torch.equal(full["labels"][:, :-1], full["input_ids"][:, 1:])


def test_ngram_metric() -> None:
    task = NGramTask(vocab_size=32, seq_len=30, seed=0)
    batch = task.sample(8, 0)
    assert ngram_accuracy(_oracle_logits(batch["labels"], 32), batch) == 1.0
    assert ngram_accuracy(_oracle_logits(batch["input_ids"], 32), batch) < 0.2


# ----------------------------------------------------------------------------- hop-k


def test_hop_k_reference_examples() -> None:
    seq = [0, 1, 2, 0, 1, 0]
    assert hop_k_reference(seq, 0) == seq
    # ind: 3 -> 1 (after the 0 at 0), 4 -> 2, 5 -> 4 (after the 0 at 3)
    assert hop_k_reference(seq, 1, blank=9) == [9, 9, 9, 1, 2, 1]
    assert hop_k_reference(seq, 2, blank=9) == [9, 9, 9, 9, 9, 2]
    assert hop_k_reference([3, 3, 3], 5, blank=9) == [9, 3, 3]  # X_{i-1} = X_i: the hop stays put


@pytest.mark.parametrize("num_chars", [2, 4])
def test_hop_k_vectorised_matches_brute_force(num_chars: int) -> None:
    g = torch.Generator().manual_seed(num_chars)
    chars = torch.randint(0, num_chars, (40, 30), generator=g)
    for k in range(0, 17):
        got = hop_k_targets(chars, k, blank=num_chars, num_chars=num_chars)
        for row, out in zip(chars.tolist(), got.tolist(), strict=True):
            assert out == hop_k_reference(row, k, blank=num_chars)
    ks = torch.randint(0, 17, (40,), generator=g)
    got = hop_k_targets(chars, ks, blank=num_chars, num_chars=num_chars)
    for row, k, out in zip(chars.tolist(), ks.tolist(), got.tolist(), strict=True):
        assert out == hop_k_reference(row, k, blank=num_chars)


def test_hop_k_task_format() -> None:
    task = HopKTask(seed=0)
    assert task.vocab_size == 4 + 1 + 17 and task.blank_id == 4 and task.k_token(16) == 21
    batch = task.sample(64, 0)
    ids, labels, mask, ks = batch["input_ids"], batch["labels"], batch["eval_mask"], batch["k"]
    assert ids.shape == labels.shape == mask.shape == (64, 101) and ks.shape == (64,)
    assert torch.equal(ids[:, 0], 5 + ks) and int(ids[:, 1:].max()) < 4
    assert (labels[:, 0] == IGNORE_INDEX).all() and not mask[:, 0].any() and mask[:, 1:].all()
    assert int(labels[:, 1:].min()) >= 0 and int(labels[:, 1:].max()) <= 4
    for r in range(64):
        assert labels[r, 1:].tolist() == hop_k_reference(ids[r, 1:].tolist(), int(ks[r]), blank=4)
    fixed = task.sample(8, 0, k=3)
    assert (fixed["k"] == 3).all() and (fixed["input_ids"][:, 0] == task.k_token(3)).all()
    assert len(set(task.sample(400, 1)["k"].tolist())) == 17


def test_hop_k_deterministic() -> None:
    task = HopKTask(seed=0)
    assert _same(task.sample(16, 2), task.sample(16, 2))
    assert not torch.equal(task.sample(16, 2)["input_ids"], task.sample(16, 3)["input_ids"])


def test_error_rate_by_k() -> None:
    task = HopKTask(seed=0, max_k=4)
    batch = task.sample(50, 0)
    perfect = _oracle_logits(batch["labels"], task.vocab_size)
    rates = error_rate_by_k(perfect, batch)
    assert set(rates) == set(batch["k"].tolist()) and all(v == 0.0 for v in rates.values())
    copy = _oracle_logits(batch["input_ids"], task.vocab_size)  # k = 0 is exactly "copy the current char"
    rates = error_rate_by_k(copy, batch)
    assert rates[0] == 0.0 and all(rates[k] > 0.3 for k in rates if k > 0)
