"""In-context copying probes on real text: a held-out span and its exact repeat, and targets whose
preceding bigram already occurred earlier in the document (where an induction head pays off)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["repeated_text_loss", "seen_bigram_loss"]


@torch.no_grad()
def repeated_text_loss(model, dataset, span: int = 64, batch: int = 16, seed: int = 0) -> dict:
    """Loss on a real-text span (first copy) and on its exact repeat right after it (second copy).

    Spans are drawn (seeded) from the documents of ``dataset`` long enough to hold one; a model that copies
    in context scores the second copy far below the first.
    """
    starts, ends = dataset.doc_starts, np.append(dataset.doc_starts[1:], len(dataset))
    long_docs = np.flatnonzero(ends - 1 - starts >= span)  # without the EOS
    if len(long_docs) == 0:
        raise ValueError(f"no document of {dataset.split!r} has {span} tokens for the repeated-text probe")
    rng = np.random.RandomState(seed)
    rows = []
    for d in rng.choice(long_docs, size=batch, replace=len(long_docs) < batch):
        s = int(rng.randint(starts[d], ends[d] - 1 - span + 1))
        rows.append(np.asarray(dataset.tokens[s:s + span], dtype=np.int64))
    first = torch.from_numpy(np.stack(rows))
    device = next(model.parameters()).device
    ids = torch.cat([first, first], dim=1).to(device)
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, 2 span - 1]
    second = slice(span - 1, 2 * span - 1)  # targets ids[span:], the repeat
    return {"span": span, "spans": batch,
            "first_copy_loss": float(nll[:, : span - 1].mean()),
            "second_copy_loss": float(nll[:, second].mean()),
            "second_copy_accuracy": float((logits[:, second].argmax(-1) == ids[:, span:]).float().mean())}


def _seen_bigram_targets(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``[T]`` bool: the target of input ``t`` follows a bigram ``(ids[t-1], ids[t])`` seen earlier in the
    same document of the row (documents restart where ``pos == 0``)."""
    out = np.zeros(len(ids), dtype=bool)
    seen: set[tuple[int, int]] = set()
    for t in range(len(ids)):
        if pos[t] == 0:
            seen = set()
            continue
        bigram = (int(ids[t - 1]), int(ids[t]))
        out[t] = bigram in seen
        seen.add(bigram)
    return out


@torch.no_grad()
def seen_bigram_loss(model, batches) -> dict:
    """Mean loss on targets whose preceding bigram already occurred earlier in the document, and on all
    other targets, over ``batches`` (dicts of ``input_ids``, ``labels``, ``position_ids``)."""
    device = next(model.parameters()).device
    sums = np.zeros(2)
    counts = np.zeros(2, dtype=np.int64)
    for b in batches:
        logits = model(b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                       use_cache=False).logits.float()
        labels = b["labels"].to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none").cpu().numpy()
        valid = (b["labels"] != -100).numpy()
        for r in range(len(nll)):
            seen = _seen_bigram_targets(b["input_ids"][r].numpy(), b["position_ids"][r].numpy())
            for k, sel in enumerate((seen & valid[r], ~seen & valid[r])):
                sums[k] += nll[r][sel].sum()
                counts[k] += int(sel.sum())
    return {"seen_bigram_loss": float(sums[0] / max(counts[0], 1)), "seen_bigram_targets": int(counts[0]),
            "other_loss": float(sums[1] / max(counts[1], 1)), "other_targets": int(counts[1])}
