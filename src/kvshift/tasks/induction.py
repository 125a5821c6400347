"""The paper's toy induction task (§3.2, App. D) with the generator's quirks fixed, plus shared task helpers.

Batch convention shared by every task in :mod:`kvshift.tasks` (all tensors ``torch.int64`` or ``bool``):

- ``input_ids`` ``[n, T]``.
- ``labels`` ``[n, T]`` **position-aligned**: ``labels[:, t]`` is the target of ``logits[:, t]``, with
  ``-100`` (:data:`IGNORE_INDEX`) where no loss is taken. Compute the loss as
  ``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` with **no further
  shift**. A Hugging Face causal LM shifts ``labels`` itself; pass it :func:`to_hf_labels` ``(labels)``.
- ``eval_mask`` ``[n, T]`` bool: the positions the task's metric scores (a subset of the labelled ones
  in the default label mode).

Generator (App. D, fixed). Per sequence, a pool of ``pool_size`` distinct ids is drawn uniformly from
the non-reserved ids ``reserved .. vocab_size-1`` (ids below ``reserved`` never appear; 0 is the pad id,
and no padding is ever needed). Then, token by token:

1. Right after a *repeat* (below), the next token is forced: it is the successor of the repeated
   token's most recent earlier occurrence.
2. Otherwise a token ``x`` is drawn uniformly from the pool, excluding the previous token (no two equal
   neighbours). If ``x`` occurred earlier this is a *repeat*: its position is an **induction
   position** and rule 1 emits its successor next.

Every emitted token updates ``succ[previous token]``, so ``succ[x]`` is always the token that followed
the latest occurrence of ``x``; a drawn repeat ``x`` is never the previous token, so its latest
occurrence has a successor and ``succ[x]`` is always known (quirk (a) of App. D). Sequences have exactly
``seq_len`` tokens (quirk (b)); a repeat drawn at the last position has no target and is not an
induction position. Sequences without an induction position are regenerated. The forced successor is
itself a seen token but not an induction position (its next token is a fresh draw); making it one would
force the rest of the sequence to replay history (quirk (c) is avoided by the "latest occurrence" rule).

Invariant (checked by :func:`check_invariants`): at every induction position ``j``, the next token
equals the token after the most recent earlier occurrence of ``input_ids[j]``.

Training target (our choice; the paper does not say): ``label_mode="all"`` (default) trains plain
next-token prediction at every position (free draws are unpredictable, so loss stays high, but accuracy
at induction positions is what the paper plots); ``label_mode="induction"`` puts labels only at
induction positions. The metric (:func:`induction_accuracy`) is next-token accuracy at induction
positions; ``first_only=True`` scores only each sequence's first one, like App. D's ``[0:1]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "InductionTask",
    "as_generator",
    "check_invariants",
    "induction_accuracy",
    "masked_accuracy",
    "previous_occurrence",
    "to_hf_labels",
]

IGNORE_INDEX = -100


def as_generator(
    seed_or_generator: int | torch.Generator | None, default: torch.Generator | None = None
) -> torch.Generator:
    """A CPU ``torch.Generator``: the given one, a fresh one seeded with an int, or ``default`` for None."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if seed_or_generator is None:
        if default is None:
            raise ValueError("a seed or a torch.Generator is required")
        return default
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed_or_generator).__name__}")
    g = torch.Generator()
    g.manual_seed(int(seed_or_generator))
    return g


def to_hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """Convert position-aligned labels to the Hugging Face convention (the model shifts them back).

    ``hf[:, t] = labels[:, t-1]`` and ``hf[:, 0] = -100``; the target of the last position is dropped
    (for next-token tasks it is always -100 anyway).
    """
    hf = torch.full_like(labels, IGNORE_INDEX)
    hf[:, 1:] = labels[:, :-1]
    return hf


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of positions in ``mask`` where ``logits.argmax(-1) == targets`` (NaN if the mask is empty)."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"logits [n, T, V], targets [n, T] and mask [n, T] disagree: "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.to(torch.bool)
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    pred = logits.detach().argmax(dim=-1)
    return float((pred == targets.to(pred.device))[mask.to(pred.device)].sum()) / total


def previous_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """``[n, T]`` index of the most recent earlier occurrence of ``ids[:, t]`` in its row, or -1."""
    a = ids.detach().cpu().numpy().astype(np.int64)
    n, T = a.shape
    a = a - a.min(initial=0)
    srt = np.sort(a * T + np.arange(T), axis=1)  # distinct keys: by token, then by position
    tok, pos = srt // T, srt % T
    prev_sorted = np.full((n, T), -1, dtype=np.int64)
    prev_sorted[:, 1:] = np.where(tok[:, 1:] == tok[:, :-1], pos[:, :-1], -1)
    out = np.empty_like(prev_sorted)
    np.put_along_axis(out, pos, prev_sorted, axis=1)
    return torch.from_numpy(out).to(ids.device)


def _sample_pools(n: int, num_ids: int, pool_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, pool_size]``: per row, ``pool_size`` distinct ints of ``0..num_ids-1`` in uniformly random order."""
    if 4 * pool_size >= num_ids:  # dense: a full random permutation per row is cheap enough
        return torch.from_numpy(
            np.argsort(torch.rand(n, num_ids, generator=gen).numpy(), axis=1)[:, :pool_size]
        )
    # Sparse: draw k >= pool_size ids with replacement and keep the first occurrence of each, in draw
    # order; sequential draws that skip repeats sample without replacement, so the result is uniform.
    dups = pool_size * pool_size / num_ids  # about the expected number of repeats among k draws
    k = pool_size + int(2 * dups + 6 * dups**0.5) + 8
    out = np.empty((n, pool_size), dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        draws = torch.randint(0, num_ids, (todo.size, k), generator=gen).numpy()
        pos = np.arange(k)
        srt = np.sort(draws * k + pos, axis=1)  # distinct keys: by id, then by draw order
        sval, spos = srt // k, srt % k
        later = np.zeros(draws.shape, dtype=bool)  # a repeat of an id drawn earlier in the row
        np.put_along_axis(later, spos[:, 1:], sval[:, 1:] == sval[:, :-1], axis=1)
        keep = ~later
        keep &= np.cumsum(keep, axis=1) <= pool_size
        ok = keep.sum(axis=1) == pool_size
        out[todo[ok]] = draws[ok][keep[ok]].reshape(-1, pool_size)
        todo = todo[~ok]
    return torch.from_numpy(out)


def _generate_chunk(
    n: int, seq_len: int, pool_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool-index sequences ``[n, T]`` and their induction positions ``[n, T]``, one time step at a time.

    The time loop is inherently sequential; each step is a handful of NumPy ops over the ``n`` rows
    (NumPy's per-op overhead is far below torch's at these sizes). All randomness comes from ``gen``.
    """
    free = torch.randint(0, pool_size - 1, (seq_len, n), generator=gen).to(torch.int32).numpy()
    last = torch.randint(0, pool_size, (n,), generator=gen).to(torch.int32).numpy()
    base = np.arange(n, dtype=np.int64) * pool_size
    # succ[row * P + x]: successor of the latest occurrence of pool entry x, -1 while x is unseen. A drawn
    # x is never the previous token, so x was seen iff its latest occurrence already has a successor.
    succ = np.full(n * pool_size, -1, dtype=np.int32)
    seq = np.empty((seq_len, n), dtype=np.int32)
    is_ind = np.zeros((seq_len, n), dtype=bool)
    seq[0] = last
    last_idx = base + last
    pending = np.full(n, -1, dtype=np.int32)  # forced next token (successor of a repeat), or -1
    for t in range(1, seq_len):
        draw = free[t]
        draw += draw >= last  # uniform over the pool minus the previous token
        forced = pending >= 0
        x = np.where(forced, pending, draw)
        idx = base + x
        sx = succ[idx]
        rep = (sx >= 0) & ~forced
        pending = np.where(rep, sx, -1).astype(np.int32)
        succ[last_idx] = x
        seq[t] = x
        is_ind[t] = rep
        last_idx, last = idx, x
    is_ind[-1] = False  # its successor would fall beyond the sequence
    return torch.from_numpy(seq.T.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(is_ind.T))


class InductionTask:
    """Seeded generator of the paper's toy induction task (App. D, fixed; see the module docstring).

    Args:
        vocab_size: total vocabulary (paper: 8,000).
        seq_len: tokens per sequence, exactly (paper: 512).
        pool_size: distinct ids available to one sequence (paper: 512).
        reserved: ids ``0..reserved-1`` never appear (paper: 11; 0 = pad).
        seed: seeds the task's own stream, used by :meth:`sample` when no seed is given.
        label_mode: ``"all"`` (next-token labels everywhere) or ``"induction"`` (only at induction
            positions).
    """

    pad_id = 0

    def __init__(
        self,
        vocab_size: int = 8000,
        seq_len: int = 512,
        pool_size: int = 512,
        reserved: int = 11,
        seed: int = 0,
        label_mode: str = "all",
    ) -> None:
        if reserved < 1:
            raise ValueError(f"reserved must be >= 1 (id 0 is the pad id), got {reserved}")
        if pool_size < 3:
            raise ValueError(f"pool_size must be >= 3, got {pool_size}")
        if pool_size > vocab_size - reserved:
            raise ValueError(
                f"pool_size {pool_size} exceeds the {vocab_size - reserved} non-reserved ids "
                f"(vocab_size {vocab_size} - reserved {reserved})"
            )
        if seq_len < 4:
            raise ValueError(
                f"seq_len must be >= 4 (a token, another, a repeat and its successor), got {seq_len}"
            )
        if label_mode not in ("all", "induction"):
            raise ValueError(f"label_mode must be 'all' or 'induction', got {label_mode!r}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.pool_size = pool_size
        self.reserved = reserved
        self.seed = seed
        self.label_mode = label_mode
        self._gen = as_generator(seed)

    def __repr__(self) -> str:
        return (
            f"InductionTask(vocab_size={self.vocab_size}, seq_len={self.seq_len}, pool_size={self.pool_size}, "
            f"reserved={self.reserved}, seed={self.seed}, label_mode={self.label_mode!r})"
        )

    def sample(
        self, n: int, seed: int | torch.Generator | None = None, *, max_attempts: int = 100
    ) -> dict[str, torch.Tensor]:
        """``n`` sequences: ``input_ids``, ``labels``, ``eval_mask`` ``[n, seq_len]`` (see the module docstring).

        ``seed``: an int (same int, same batch), a ``torch.Generator`` (advanced), or None (the task's
        own stream, seeded by ``seed`` at construction: successive calls give new batches).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gen = as_generator(seed, self._gen)
        T, P = self.seq_len, self.pool_size
        chunk = max(1, min(n, (1 << 22) // max(P, T)))  # bounds the [chunk, P] successor table
        seqs, inds = [], []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            seq, ind = _generate_chunk(m, T, P, gen)
            for _ in range(max_attempts):
                bad = ~ind.any(dim=1)
                if not bad.any():
                    break
                seq[bad], ind[bad] = _generate_chunk(int(bad.sum()), T, P, gen)
            if not ind.any(dim=1).all():
                raise RuntimeError(
                    f"no repeat in some sequences after {max_attempts} attempts: seq_len {T} is too short "
                    f"for pool_size {P}; use a smaller pool or longer sequences"
                )
            pools = _sample_pools(m, self.vocab_size - self.reserved, P, gen)
            seqs.append(pools.gather(1, seq) + self.reserved)
            inds.append(ind)
        input_ids = torch.cat(seqs)
        eval_mask = torch.cat(inds)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:]
        if self.label_mode == "induction":
            labels = torch.where(eval_mask, labels, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "eval_mask": eval_mask}

    def check_invariants(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise ``AssertionError`` unless ``batch`` satisfies every promise of this generator."""
        check_invariants(
            batch,
            vocab_size=self.vocab_size,
            reserved=self.reserved,
            seq_len=self.seq_len,
            pool_size=self.pool_size,
            label_mode=self.label_mode,
        )


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def check_invariants(
    batch: Mapping[str, torch.Tensor],
    *,
    vocab_size: int | None = None,
    reserved: int = 1,
    seq_len: int | None = None,
    pool_size: int | None = None,
    label_mode: str | None = None,
) -> None:
    """Raise ``AssertionError`` unless every induction target is the successor of the latest earlier occurrence.

    Also checks: shapes and dtypes; fixed length; no id below ``reserved`` (so no pad); ids below
    ``vocab_size``; at least one induction position per row and none at the last position; eval
    positions are exactly repeats whose next token follows the rule; no two equal neighbours; at most
    ``pool_size`` distinct ids per row; labels match ``label_mode``.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["eval_mask"]
    if ids.dtype != torch.long or labels.dtype != torch.long or mask.dtype != torch.bool:
        _fail(f"dtypes must be int64/int64/bool, got {ids.dtype}/{labels.dtype}/{mask.dtype}")
    if ids.dim() != 2 or labels.shape != ids.shape or mask.shape != ids.shape:
        _fail(
            f"input_ids, labels, eval_mask must share one [n, T] shape: {ids.shape}, {labels.shape}, {mask.shape}"
        )
    n, T = ids.shape
    if seq_len is not None and T != seq_len:
        _fail(f"sequence length {T} != seq_len {seq_len}")
    if int(ids.min()) < reserved:
        _fail(f"an id below reserved={reserved} (pad or special) appears: min id {int(ids.min())}")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        _fail(f"id {int(ids.max())} >= vocab_size {vocab_size}")
    if bool((ids[:, 1:] == ids[:, :-1]).any()):
        _fail("two equal neighbouring tokens")
    if bool(mask[:, -1].any()):
        _fail("an induction position at the last token (its target lies beyond the sequence)")
    if not bool(mask.any(dim=1).all()):
        _fail(
            f"rows without any induction position: {torch.nonzero(~mask.any(dim=1)).flatten().tolist()[:10]}"
        )
    prev = previous_occurrence(ids)
    if bool((mask & (prev < 0)).any()):
        _fail("an induction position whose token never occurred earlier")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    target = ids[rows, cols + 1]
    expected = ids[rows, prev[rows, cols] + 1]
    bad = target != expected
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        _fail(
            f"row {int(rows[i])}, position {int(cols[i])}: target {int(target[i])} != successor "
            f"{int(expected[i])} of the latest earlier occurrence at {int(prev[rows[i], cols[i]])}"
        )
    if pool_size is not None:
        distinct = (torch.sort(ids, dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1
        if int(distinct.max()) > pool_size:
            _fail(f"a row uses {int(distinct.max())} distinct ids > pool_size {pool_size}")
    nxt = torch.full_like(ids, IGNORE_INDEX)
    nxt[:, :-1] = ids[:, 1:]
    if label_mode == "all" and not torch.equal(labels, nxt):
        _fail("labels (mode 'all') must be the next token at every position and -100 at the last")
    if label_mode == "induction" and not torch.equal(labels, torch.where(mask, nxt, IGNORE_INDEX)):
        _fail("labels (mode 'induction') must be the next token at induction positions and -100 elsewhere")
    if label_mode is None and not bool((labels[mask] == nxt[mask]).all()):
        _fail("labels at induction positions must be the next token")


def induction_accuracy(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], first_only: bool = False
) -> float:
    """Next-token accuracy at induction positions; ``first_only``: each row's first one (App. D's metric).

    ``logits`` ``[n, T, V]`` are position-aligned with ``batch["input_ids"]`` (``logits[:, t]`` predicts
    the token at ``t + 1``).
    """
    ids, mask = batch["input_ids"], batch["eval_mask"].to(torch.bool)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    if first_only:
        first = torch.where(mask.any(dim=1), mask.to(torch.int8).argmax(dim=1), -1)
        mask = torch.zeros_like(mask)
        has = first >= 0
        mask[torch.nonzero(has).flatten(), first[has]] = True
    return masked_accuracy(logits, targets, mask)
