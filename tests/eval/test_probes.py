"""Copying probes on real text: the repeat's loss is read at the right positions; seen-bigram targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvshift.data.bytes import ByteCorpus
from kvshift.eval.probes import _seen_bigram_targets, repeated_text_loss, seen_bigram_loss


class _Oracle(torch.nn.Module):
    """Knows the text repeats with period ``period``: predicts ``ids[t - period + 1]`` from position
    ``period - 1`` on, token 0 before (so the probe must read the repeat at exactly the right positions)."""

    def __init__(self, vocab, period):
        super().__init__()
        self.vocab, self.period = vocab, period
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, position_ids=None, use_cache=False):
        B, T = ids.shape
        logits = torch.full((B, T, self.vocab), -30.0)
        logits[:, : self.period - 1, 0] = 30.0
        for t in range(self.period - 1, T):
            logits[torch.arange(B), t, ids[:, t - self.period + 1]] = 30.0
        return type("Out", (), {"logits": logits})()


def _corpus():
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(97, 123, n).astype(np.uint8)) for n in (50, 300, 7, 200)]
    return ByteCorpus(docs, split="val")


def test_repeated_text_uses_real_spans_and_scores_the_repeat():
    ds = _corpus()
    out = repeated_text_loss(_Oracle(ds.vocab_size, 40), ds, span=40, batch=6, seed=1)
    assert out["second_copy_accuracy"] == 1.0
    assert out["second_copy_loss"] < 1e-6 and out["first_copy_loss"] > 10  # letters are never id 0
    assert out["span"] == 40 and out["spans"] == 6
    with pytest.raises(ValueError, match="repeated-text probe"):
        repeated_text_loss(_Oracle(ds.vocab_size, 1000), ds, span=1000)


def test_seen_bigram_targets_reset_at_documents():
    ids = np.array([5, 6, 7, 5, 6, 9, 5, 6])
    pos = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    # t=4: bigram (5, 6) seen at t=1 -> its target is "seen"; after the reset at t=6 nothing is seen
    assert _seen_bigram_targets(ids, pos).tolist() == [False, False, False, False, True, False, False, False]


def test_seen_bigram_loss_splits_targets():
    ds = _corpus()
    from kvshift.data.packing import validation_batches, validation_rows

    rows = validation_rows(ds, 64)
    out = seen_bigram_loss(_Oracle(ds.vocab_size, 2), validation_batches(ds, 4, rows))
    n = sum(int((b["labels"] != -100).sum()) for b in validation_batches(ds, 4, rows))
    assert out["seen_bigram_targets"] + out["other_targets"] == n
    assert out["seen_bigram_targets"] > 0
