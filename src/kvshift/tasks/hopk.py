"""The hop-k multi-hop induction task (Sanford, Hsu & Telgarsky 2024; paper App. H, Fig. 9), vectorised.

Definition used here (stated in full because we could not consult the original code). For a character
sequence ``X = X_0 .. X_{N-1}`` (0-indexed):

- ``ind(i) = 1 + max{j < i : X_j = X_i}``: the position right after the latest earlier occurrence
  of ``X_i`` (one induction-head step); undefined when ``X_i`` has not occurred before. Note
  ``ind(i) <= i``, with equality when ``X_{i-1} = X_i`` (then the hop stays put).
- ``hop_0(i) = i`` and ``hop_k(i) = ind(hop_{k-1}(i))``, undefined once any step is undefined.
- The target at ``i`` is ``X_{hop_k(i)}``, or the blank symbol when ``hop_k(i)`` is undefined. So
  ``k = 0`` copies the current character and ``k = 1`` is the ordinary induction head.

Format. Ids ``0..num_chars-1`` are the characters, ``num_chars`` is the blank, and
``num_chars + 1 + k`` is the hop-count token for ``k = 0..max_k`` (``vocab_size = num_chars + max_k + 2``).
A sequence is ``[k-token, X_0, ..., X_{N-1}]`` (``1 + seq_len`` tokens), characters i.i.d. uniform.
Targets are full-sequence and position-aligned (not next-token): ``labels[:, 1 + i]`` is the target
of ``X_i``, read from ``logits[:, 1 + i]``; the k-token carries ``-100``. Every character position is
scored (``eval_mask``); :func:`error_rate_by_k` reports the per-token error rate for each k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .induction import IGNORE_INDEX, as_generator

__all__ = ["HopKTask", "error_rate_by_k", "hop_k_reference", "hop_k_targets"]


def hop_k_reference(seq: Sequence[int], k: int, blank: int | None = None) -> list[int | None]:
    """Pure-Python hop-k of ``seq`` (the definition in the module docstring); ``blank`` where undefined."""
    out: list[int | None] = []
    for i in range(len(seq)):
        p: int | None = i
        for _ in range(k):
            earlier = [j for j in range(p) if seq[j] == seq[p]]
            if not earlier:
                p = None
                break
            p = earlier[-1] + 1
        out.append(blank if p is None else seq[p])
    return out


def _hop_k_chunk(chars: np.ndarray, k: np.ndarray, blank: int, num_chars: int) -> np.ndarray:
    n, N = chars.shape
    W = N + 1  # an extra column per row: the undefined position, which maps to itself and reads blank
    pos = np.arange(N, dtype=np.int64)
    prev = np.full((n, N), -1, dtype=np.int64)
    for c in range(num_chars):
        is_c = chars == c
        latest = np.maximum.accumulate(np.where(is_c, pos, -1), axis=1)  # latest j <= i with X_j = c
        prev[:, 1:] = np.where(is_c[:, 1:], latest[:, :-1], prev[:, 1:])
    base = (np.arange(n, dtype=np.int64) * W)[:, None]
    step = np.empty((n, W), dtype=np.int64)  # one hop, as flat indices into the [n, W] table
    step[:, :N] = np.where(prev >= 0, prev + 1, N) + base
    step[:, N] = N + base[:, 0]
    step = step.reshape(-1)
    order = np.argsort(-k, kind="stable")  # rows by decreasing k: the rows still hopping form a prefix
    k_sorted = k[order]
    cur = (pos + base[order]).copy()  # [n, N] flat positions, rows in `order`
    for s in range(int(k_sorted[0]) if n else 0):
        m = int(np.searchsorted(-k_sorted, -s, side="left"))  # rows with k > s
        cur[:m] = step[cur[:m]]
    ext = np.full((n, W), blank, dtype=np.int64)
    ext[:, :N] = chars
    out = np.empty((n, N), dtype=np.int64)
    out[order] = ext.reshape(-1)[cur]
    return out


def hop_k_targets(
    chars: torch.Tensor, k: torch.Tensor | int, blank: int, num_chars: int | None = None
) -> torch.Tensor:
    """Vectorised hop-k: ``[n, N]`` targets for characters ``chars`` ``[n, N]`` and hop counts ``k`` (``[n]`` or int).

    Pointer jumping over a precomputed one-hop table, with a sentinel column for "undefined". Runs in
    NumPy, in row chunks that stay in cache; costs ``O(n * N * (num_chars + max k))``.
    """
    n, N = chars.shape
    if isinstance(k, int):
        k = torch.full((n,), k, dtype=torch.long)
    if tuple(k.shape) != (n,):
        raise ValueError(f"k must be an int or a [n] = [{n}] tensor, got shape {tuple(k.shape)}")
    if num_chars is None:
        num_chars = int(chars.max()) + 1 if chars.numel() else 1
    c_np = chars.detach().cpu().numpy().astype(np.int64)
    k_np = k.detach().cpu().numpy().astype(np.int64)
    out = np.empty((n, N), dtype=np.int64)
    chunk = max(1, (1 << 19) // max(N, 1))
    for i in range(0, n, chunk):
        out[i : i + chunk] = _hop_k_chunk(c_np[i : i + chunk], k_np[i : i + chunk], blank, num_chars)
    return torch.from_numpy(out).to(chars.device)


class HopKTask:
    """Seeded generator of hop-k sequences (see the module docstring for the definition and format).

    Args:
        num_chars: alphabet size (Sanford et al.: 4).
        seq_len: characters per sequence, not counting the leading k-token (Sanford et al.: 100).
        max_k: largest hop count (paper Fig. 9: 16).
        seed: seeds the task's own stream, used by :meth:`sample` when no seed is given.
    """

    def __init__(self, num_chars: int = 4, seq_len: int = 100, max_k: int = 16, seed: int = 0) -> None:
        if num_chars < 1 or seq_len < 1 or max_k < 0:
            raise ValueError(
                f"need num_chars >= 1, seq_len >= 1, max_k >= 0; got {num_chars}, {seq_len}, {max_k}"
            )
        self.num_chars = num_chars
        self.seq_len = seq_len
        self.max_k = max_k
        self.seed = seed
        self.blank_id = num_chars
        self.vocab_size = num_chars + max_k + 2
        self._gen = as_generator(seed)

    def __repr__(self) -> str:
        return f"HopKTask(num_chars={self.num_chars}, seq_len={self.seq_len}, max_k={self.max_k}, seed={self.seed})"

    def k_token(self, k: int) -> int:
        """Id of the hop-count token for ``k``."""
        if not 0 <= k <= self.max_k:
            raise ValueError(f"k must be in [0, {self.max_k}], got {k}")
        return self.num_chars + 1 + k

    def sample(
        self, n: int, seed: int | torch.Generator | None = None, k: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``n`` sequences: ``input_ids``, ``labels``, ``eval_mask`` ``[n, 1 + seq_len]`` and ``k`` ``[n]``.

        ``k``: a fixed hop count, or None for one drawn uniformly from ``0..max_k`` per sequence.
        ``seed``: an int, a ``torch.Generator`` or None (the task's own stream).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gen = as_generator(seed, self._gen)
        if k is None:
            ks = torch.randint(0, self.max_k + 1, (n,), generator=gen)
        else:
            self.k_token(k)  # validates the range
            ks = torch.full((n,), k, dtype=torch.long)
        chars = torch.randint(0, self.num_chars, (n, self.seq_len), generator=gen)
        targets = hop_k_targets(chars, ks, self.blank_id, self.num_chars)
        input_ids = torch.cat([(self.num_chars + 1 + ks)[:, None], chars], dim=1)
        labels = torch.cat([torch.full((n, 1), IGNORE_INDEX, dtype=torch.long), targets], dim=1)
        eval_mask = torch.ones_like(input_ids, dtype=torch.bool)
        eval_mask[:, 0] = False
        return {"input_ids": input_ids, "labels": labels, "eval_mask": eval_mask, "k": ks}


def error_rate_by_k(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[int, float]:
    """Per-token error rate at the scored positions, for each hop count present in ``batch``.

    ``logits`` ``[n, 1 + seq_len, V]`` are position-aligned with ``batch["labels"]``.
    """
    labels, mask, ks = batch["labels"], batch["eval_mask"].to(torch.bool), batch["k"]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    wrong = (logits.detach().argmax(dim=-1) != labels.to(logits.device)).cpu() & mask.cpu()
    out: dict[int, float] = {}
    for k in sorted(set(ks.tolist())):
        rows = ks.cpu() == k
        total = int(mask.cpu()[rows].sum())
        out[int(k)] = float(wrong[rows].sum()) / total if total else float("nan")
    return out
