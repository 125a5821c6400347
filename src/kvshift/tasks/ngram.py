"""The paper's 3-gram memorisation control (§3.3, Fig. 3): a fixed table of (x1, x2) -> x3 triples.

The paper gives only "about 200 random (x1, x2) pairs, each with a random x3"; the rest is our choice:

- The table: ``num_pairs`` distinct (x1, x2) pairs drawn uniformly from the non-reserved ids
  (``reserved .. vocab_size-1``), each with an x3 drawn uniformly from the same ids. It is fixed by
  the task's ``seed``; :meth:`NGramTask.sample` only draws which triples make up a sequence.
- A sequence is a concatenation of triples ``x1 x2 x3`` drawn uniformly (with replacement) from the
  table, cut to exactly ``seq_len`` tokens (a trailing partial triple carries no label); no padding.
- Labels (position-aligned, see :mod:`kvshift.tasks.induction`): ``label_mode="x3"`` (default) puts the
  target x3 at each x2 position only; ``label_mode="all"`` trains next-token prediction everywhere
  (x2 given x1 is partly predictable, the next triple's x1 is not).
- Metric: accuracy of predicting x3 at the x2 positions (``eval_mask``).

With a small vocabulary (e.g. 32 ids and 200 pairs) many pairs share x1 or x2, so both are needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .induction import IGNORE_INDEX, as_generator, masked_accuracy

__all__ = ["NGramTask", "ngram_accuracy"]


class NGramTask:
    """Seeded generator of the 3-gram control task (see the module docstring).

    Args:
        vocab_size: total vocabulary; ids ``0..reserved-1`` never appear (0 = pad).
        num_pairs: number of (x1, x2) -> x3 entries in the table (paper: about 200).
        seq_len: tokens per sequence, exactly.
        seed: fixes the table, and seeds the task's own stream used by :meth:`sample` without a seed.
        reserved: number of reserved ids at the bottom of the vocabulary.
        label_mode: ``"x3"`` (labels at x2 positions only) or ``"all"`` (next token everywhere).
    """

    pad_id = 0

    def __init__(
        self,
        vocab_size: int = 64,
        num_pairs: int = 200,
        seq_len: int = 96,
        seed: int = 0,
        reserved: int = 1,
        label_mode: str = "x3",
    ) -> None:
        if reserved < 1:
            raise ValueError(f"reserved must be >= 1 (id 0 is the pad id), got {reserved}")
        num_ids = vocab_size - reserved
        if num_ids < 2:
            raise ValueError(
                f"need at least 2 non-reserved ids, got vocab_size {vocab_size}, reserved {reserved}"
            )
        if not 1 <= num_pairs <= num_ids * num_ids:
            raise ValueError(
                f"num_pairs must be in [1, {num_ids * num_ids}] for {num_ids} ids, got {num_pairs}"
            )
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (one full triple), got {seq_len}")
        if label_mode not in ("x3", "all"):
            raise ValueError(f"label_mode must be 'x3' or 'all', got {label_mode!r}")
        self.vocab_size = vocab_size
        self.num_pairs = num_pairs
        self.seq_len = seq_len
        self.seed = seed
        self.reserved = reserved
        self.label_mode = label_mode
        g = as_generator(seed)
        chosen: dict[int, None] = {}  # ordered set of pair codes x1 * num_ids + x2
        while len(chosen) < num_pairs:
            for code in torch.randint(0, num_ids * num_ids, (2 * num_pairs,), generator=g).tolist():
                chosen.setdefault(code)
                if len(chosen) == num_pairs:
                    break
        codes = torch.tensor(list(chosen), dtype=torch.long)
        x3 = torch.randint(0, num_ids, (num_pairs,), generator=g)
        self.table = torch.stack([codes // num_ids, codes % num_ids, x3], dim=1) + reserved  # [num_pairs, 3]
        self._gen = g  # the task's own sample stream continues after the table draws

    def __repr__(self) -> str:
        return (
            f"NGramTask(vocab_size={self.vocab_size}, num_pairs={self.num_pairs}, seq_len={self.seq_len}, "
            f"seed={self.seed}, reserved={self.reserved}, label_mode={self.label_mode!r})"
        )

    def lookup(self) -> dict[tuple[int, int], int]:
        """The table as a Python dict ``{(x1, x2): x3}``."""
        return {(a, b): c for a, b, c in self.table.tolist()}

    def sample(self, n: int, seed: int | torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``n`` sequences: ``input_ids``, ``labels``, ``eval_mask`` ``[n, seq_len]`` and ``triple_ids``.

        ``triple_ids`` ``[n, ceil(seq_len / 3)]`` are the table rows used. ``seed``: an int, a
        ``torch.Generator`` or None (the task's own stream).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gen = as_generator(seed, self._gen)
        T = self.seq_len
        n_trip = -(-T // 3)
        triple_ids = torch.randint(0, self.num_pairs, (n, n_trip), generator=gen)
        input_ids = self.table[triple_ids].reshape(n, 3 * n_trip)[:, :T].contiguous()
        pos = torch.arange(T)
        eval_mask = ((pos % 3 == 1) & (pos + 1 < T)).expand(n, T).clone()
        nxt = torch.full_like(input_ids, IGNORE_INDEX)
        nxt[:, :-1] = input_ids[:, 1:]
        labels = nxt if self.label_mode == "all" else torch.where(eval_mask, nxt, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "eval_mask": eval_mask, "triple_ids": triple_ids}

    def check_invariants(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise ``AssertionError`` unless every full triple of ``batch`` is in the table and labels agree."""
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["eval_mask"]
        if ids.dtype != torch.long or labels.dtype != torch.long or mask.dtype != torch.bool:
            raise AssertionError(
                f"dtypes must be int64/int64/bool, got {ids.dtype}/{labels.dtype}/{mask.dtype}"
            )
        n, T = ids.shape
        if T != self.seq_len or labels.shape != ids.shape or mask.shape != ids.shape:
            raise AssertionError(
                f"shapes must all be [n, {self.seq_len}]: {ids.shape}, {labels.shape}, {mask.shape}"
            )
        if int(ids.min()) < self.reserved or int(ids.max()) >= self.vocab_size:
            raise AssertionError("an id outside the non-reserved vocabulary")
        full = (T // 3) * 3
        triples = ids[:, :full].reshape(n, -1, 3)
        table = self.lookup()
        for a, b, c in triples.reshape(-1, 3).unique(dim=0).tolist():
            if table.get((a, b)) != c:
                raise AssertionError(f"triple ({a}, {b}, {c}) is not in the table")
        if T % 3:  # the trailing partial triple must still be a prefix of a table entry
            tail = ids[:, full:]
            prefixes = {tuple(r[: T % 3]) for r in self.table.tolist()}
            for row in tail.unique(dim=0).tolist():
                if tuple(row) not in prefixes:
                    raise AssertionError(f"trailing partial triple {row} is no prefix of a table entry")
        pos = torch.arange(T)
        if not torch.equal(mask, ((pos % 3 == 1) & (pos + 1 < T)).expand(n, T)):
            raise AssertionError("eval_mask must mark exactly the x2 positions of full triples")
        if not torch.equal(labels[mask], ids[:, 1:][mask[:, :-1]]):
            raise AssertionError("labels at x2 positions must be x3")
        if self.label_mode == "x3" and bool((labels[~mask] != IGNORE_INDEX).any()):
            raise AssertionError("label_mode 'x3' must leave every other position at -100")


def ngram_accuracy(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> float:
    """Accuracy of predicting x3 at the x2 positions; ``logits`` ``[n, T, V]`` position-aligned."""
    ids = batch["input_ids"]
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    return masked_accuracy(logits, targets, batch["eval_mask"])
