"""Theorem 2: a hand-built 1-layer, 1-head KV-shifting attention of width d is an induction head (no training).

Construction (paper App. B): token embeddings ``x = E[token]`` with ``E`` i.i.d. ``N(0, 1/d)`` (nearly
orthogonal, norm about 1); ``W_Q = W_K = W_V = W_O = I``; key shift (current 0, previous 1), so
``k_s = x_{s-1}`` (and ``k_0 = 0``); value shift (current 1, previous 0), so ``v_s = x_s``. The head at
query position ``t`` computes::

    o_t = sum_{s <= t} softmax_s( <x_t, k_s> / sigma - m (t - s) ) v_s

and predicts the token whose embedding has the largest dot product with ``o_t``. A key matches the
query exactly where ``x_{s-1} = x_t``, so the head reads ``x_s``, the successor of an earlier occurrence
of the current token; the ALiBi slope ``m`` makes the most recent occurrence win. This needs
``1/sigma >> m * T`` (a match far back must still beat unmatched recent keys) and ``m >~ 1`` (the most
recent of several occurrences must dominate), e.g. ``m = 1``, ``sigma = 1e-4``.

Boundary caveat. Definition 1 sums over ``s = 2 .. L-1`` (1-indexed); a causal head also scores
``s = L`` (key ``x_{L-1}``, value the current token, no recency penalty) and ``s = 1`` (zero key).
``boundary="exact"`` masks those two, and then the head equals Definition 1's IH(X) to rounding
(checked against an explicit implementation, :func:`ih_reference`); ``boundary="causal"`` is the
plain causal head, whose extra terms are negligible in the regime above (both are reported).

The same weights without the shift (key and value weights (1, 0)) match the current token's own key,
whose value is the current token: the head copies the current token and the induction accuracy is ~0.
The shift is applied with :func:`kvshift.ops.kv_shift.kv_shift_ref`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..ops.kv_shift import kv_shift_ref
from ..report import get_pyplot, markdown_table, mean_std, save_figure
from ..tasks.induction import InductionTask
from .common import ROW_COLUMNS, write_results

__all__ = [
    "KEY_SHIFT",
    "VALUE_SHIFT",
    "IDENTITY_SHIFT",
    "evaluate_theorem2",
    "ih_reference",
    "max_ih_deviation",
    "random_embeddings",
    "run_theorem2",
    "theorem2_head",
]

KEY_SHIFT = (0.0, 1.0)  # (current, previous): key_s = x_{s-1}
VALUE_SHIFT = (1.0, 0.0)  # value_s = x_s
IDENTITY_SHIFT = (1.0, 0.0)  # shift disabled: vanilla attention


def random_embeddings(
    vocab_size: int, d: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``[vocab_size, d]`` i.i.d. ``N(0, 1/d)`` embeddings: norms about 1, pairwise dot products about ``1/sqrt(d)``."""
    return torch.randn(vocab_size, d, generator=generator, dtype=dtype) / d**0.5


def theorem2_head(
    x: torch.Tensor,
    *,
    sigma: float,
    slope: float,
    kv_shift: bool = True,
    boundary: str = "causal",
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Theorem 2 head on embedded sequences ``x`` ``[B, T, d]``; returns ``o`` ``[B, Q, d]``.

    ``query_positions`` ``[B, Q]`` selects the query positions (default: all ``T``). ``kv_shift=False``
    uses identity shift weights (vanilla attention with the same identity projections). ``boundary``:
    ``"causal"`` (keys ``s <= t``) or ``"exact"`` (keys ``1 <= s <= t-1``, 0-indexed, as in Definition 1).
    A query with no admissible key returns zeros.
    """
    if boundary not in ("causal", "exact"):
        raise ValueError(f"boundary must be 'causal' or 'exact', got {boundary!r}")
    B, T, d = x.shape
    k_w = torch.tensor([KEY_SHIFT if kv_shift else IDENTITY_SHIFT], dtype=x.dtype)  # [H=1, 2]
    v_w = torch.tensor([VALUE_SHIFT if kv_shift else IDENTITY_SHIFT], dtype=x.dtype)
    k = kv_shift_ref(x[:, :, None, :], k_w)[:, :, 0]  # [B, T, d]; W_K = I
    v = kv_shift_ref(x[:, :, None, :], v_w)[:, :, 0]  # W_V = I
    if query_positions is None:
        query_positions = torch.arange(T).expand(B, T)
    qp = query_positions.long()
    q = x.gather(1, qp[:, :, None].expand(-1, -1, d))  # [B, Q, d]; W_Q = I
    s = torch.arange(T)
    dist = qp[:, :, None] - s  # [B, Q, T]: t - s
    scores = torch.einsum("bqd,bsd->bqs", q, k) / sigma - slope * dist.to(x.dtype)
    allowed = dist >= 0
    if boundary == "exact":
        allowed &= (dist >= 1) & (s >= 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without any key: zeros
    return torch.einsum("bqs,bsd->bqd", attn, v)  # W_O = I


def ih_reference(x: torch.Tensor, t: int, *, sigma: float, slope: float) -> torch.Tensor:
    """Definition 1, literally: ``sum_{s=2}^{L-1} softmax_s(x_L . x_{s-1} / sigma - m |L - s|) x_s`` for ``L = t + 1``.

    ``x`` ``[T, d]`` is one embedded sequence, ``t`` a 0-indexed query position (``t >= 2``).
    """
    L = t + 1
    logits, values = [], []
    for s1 in range(2, L):  # 1-indexed s, as in the paper
        logits.append(float(x[L - 1] @ x[s1 - 2]) / sigma - slope * abs(L - s1))
        values.append(x[s1 - 1])
    w = torch.softmax(torch.tensor(logits, dtype=x.dtype), dim=0)
    return (w[:, None] * torch.stack(values)).sum(dim=0)


def _pick_queries(
    eval_mask: torch.Tensor, per_seq: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_seq`` induction positions per row, always including the first: ``(positions, valid)``."""
    keys = torch.rand(eval_mask.shape, generator=gen)
    first = eval_mask.to(torch.int8).argmax(dim=1)
    keys[torch.arange(eval_mask.shape[0]), first] = 2.0  # keep App. D's first prediction position
    keys = keys.masked_fill(~eval_mask, -1.0)
    k = min(per_seq, eval_mask.shape[1])
    top, pos = keys.topk(k, dim=1)
    return pos, top >= 0


def evaluate_theorem2(
    *,
    seed: int,
    d: int,
    sigma: float,
    slope: float,
    task: InductionTask,
    num_seqs: int,
    queries_per_seq: int,
    kv_shift: bool = True,
    boundary: str = "causal",
    batch_size: int = 16,
) -> dict[str, float]:
    """Accuracy of the hand-built head on ``num_seqs`` induction sequences (embeddings and data from ``seed``).

    Returns ``accuracy`` (prediction = successor of the latest earlier occurrence), ``first_accuracy``
    (first induction position of each sequence only), ``copy_current_rate`` (prediction = current
    token) and ``queries`` (number of scored positions).
    """
    gen = torch.Generator().manual_seed(seed)
    E = random_embeddings(task.vocab_size, d, gen)
    batch = task.sample(num_seqs, gen)
    ids, mask = batch["input_ids"], batch["eval_mask"]
    qpos, valid = _pick_queries(mask, queries_per_seq, gen)
    correct = copied = first_correct = total = 0
    for i in range(0, num_seqs, batch_size):
        sl = slice(i, i + batch_size)
        x = E[ids[sl]]  # [b, T, d]
        o = theorem2_head(
            x, sigma=sigma, slope=slope, kv_shift=kv_shift, boundary=boundary, query_positions=qpos[sl]
        )
        pred = (o.float() @ E.float().T).argmax(dim=-1)  # nearest embedding by dot product; [b, Q]
        target = ids[sl].gather(1, (qpos[sl] + 1).clamp(max=ids.shape[1] - 1))
        current = ids[sl].gather(1, qpos[sl])
        v = valid[sl]
        correct += int(((pred == target) & v).sum())
        copied += int(((pred == current) & v).sum())
        first_correct += int((pred[:, 0] == target[:, 0]).sum())  # column 0 is the first position
        total += int(v.sum())
    return {
        "accuracy": correct / total,
        "first_accuracy": first_correct / num_seqs,
        "copy_current_rate": copied / total,
        "queries": total,
    }


def max_ih_deviation(
    *,
    seed: int,
    d: int,
    sigma: float,
    slope: float,
    task: InductionTask,
    num_seqs: int = 2,
    boundary: str = "exact",
) -> dict[str, float]:
    """Largest ``|head - IH|`` entry over ``num_seqs`` sequences: at ``"induction"`` positions and at ``"all"`` ``t >= 2``.

    At a position whose token has no earlier occurrence, the causal head's extra key ``s = L`` (no
    recency penalty) takes most of the attention, so ``"all"`` shows the boundary terms in full.
    """
    gen = torch.Generator().manual_seed(seed)
    E = random_embeddings(task.vocab_size, d, gen)
    batch = task.sample(num_seqs, gen)
    ids, mask = batch["input_ids"], batch["eval_mask"]
    x = E[ids]
    o = theorem2_head(x, sigma=sigma, slope=slope, kv_shift=True, boundary=boundary)
    worst = {"induction": 0.0, "all": 0.0}
    for b in range(num_seqs):
        for t in range(2, ids.shape[1]):
            dev = float((o[b, t] - ih_reference(x[b], t, sigma=sigma, slope=slope)).abs().max())
            worst["all"] = max(worst["all"], dev)
            if mask[b, t]:
                worst["induction"] = max(worst["induction"], dev)
    return worst


VARIANTS = (
    ("KV shift (Thm 2 weights), causal s<=L", True, "causal"),
    ("KV shift (Thm 2 weights), s in [2, L-1]", True, "exact"),
    ("vanilla (same weights, shift off)", False, "causal"),
)


def _plot(
    path: Path,
    sigmas: Sequence[float],
    sweep_sigma: dict[str, list[float]],
    dims: Sequence[int],
    sweep_d: dict[str, list[float]],
    cfg: dict[str, Any],
) -> None:
    plt = get_pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    fig.subplots_adjust(wspace=0.25)
    styles = {
        VARIANTS[0][0]: ("tab:blue", "o", "-"),
        VARIANTS[1][0]: ("tab:green", "s", "--"),
        VARIANTS[2][0]: ("tab:red", "^", "-"),
    }
    for name, vals in sweep_sigma.items():
        c, m, ls = styles[name]
        a1.plot(sigmas, vals, color=c, marker=m, ls=ls, label=name)
    a1.set_xscale("log")
    a1.axvline(cfg["sigma"], color="gray", lw=0.8, ls=":")
    a1.set_xlabel(r"temperature $\sigma$")
    a1.set_ylabel("induction accuracy")
    a1.set_title(f"vs sigma (d={cfg['d']}, m={cfg['slope']}, T={cfg['seq_len']}, V={cfg['vocab_size']})")
    for name, vals in sweep_d.items():
        c, m, ls = styles[name]
        a2.plot(dims, vals, color=c, marker=m, ls=ls, label=name)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("width d (= embedding dim)")
    a2.set_title(f"vs width (sigma={cfg['sigma']:g}, m={cfg['slope']})")
    for ax in (a1, a2):
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    a1.legend(loc="center left", fontsize=8)
    fig.suptitle("Theorem 2: hand-built 1-layer KV-shifting head, no training (nearest-embedding readout)")
    save_figure(fig, path)


def run_theorem2(
    quick: bool = False,
    seeds: int = 3,
    out_dir: str | os.PathLike = "runs/theorem2",
    *,
    d: int | None = None,
    sigma: float = 1e-4,
    slope: float = 1.0,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    pool_size: int | None = None,
    num_seqs: int | None = None,
    queries_per_seq: int | None = None,
    sigmas: Sequence[float] | None = None,
    dims: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate the Theorem 2 construction; write results.json/.md, config.json and theorem2.png into ``out_dir``.

    Default sizes follow the paper's toy task (vocabulary 8,000, length 512, pool 512) at d = 256;
    ``quick`` shrinks everything for a CPU smoke run. Rows: accuracy of the three variants
    (:data:`VARIANTS`) over ``seeds`` (each seed draws new embeddings and sequences), the vanilla head's
    copy-current rate, and the largest deviation from Definition 1's IH. Returns the payload plus
    ``"markdown"``.
    """
    t0 = time.perf_counter()
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    cfg: dict[str, Any] = {
        "experiment": "theorem2",
        "quick": quick,
        "seeds": seeds,
        "d": d or (128 if quick else 256),
        "sigma": sigma,
        "slope": slope,
        "vocab_size": vocab_size or (1000 if quick else 8000),
        "seq_len": seq_len or (128 if quick else 512),
        "pool_size": pool_size or (64 if quick else 512),
        "reserved": 11,
        "num_seqs": num_seqs or (32 if quick else 64),
        "queries_per_seq": queries_per_seq or (16 if quick else 32),
        "sigmas": list(
            sigmas
            or (
                [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
                if quick
                else [1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0]
            )
        ),
        "dims": list(dims or ([8, 32, 128] if quick else [8, 16, 32, 64, 128, 256, 512])),
        "readout": "argmax over all vocabulary embeddings of <E[v], o_L>",
        "embeddings": "iid N(0, 1/d)",
        "key_shift (current, previous)": list(KEY_SHIFT),
        "value_shift (current, previous)": list(VALUE_SHIFT),
        "vanilla shift (current, previous)": list(IDENTITY_SHIFT),
    }
    task = InductionTask(
        vocab_size=cfg["vocab_size"],
        seq_len=cfg["seq_len"],
        pool_size=cfg["pool_size"],
        reserved=cfg["reserved"],
        seed=0,
    )
    common = {
        "slope": slope,
        "task": task,
        "num_seqs": cfg["num_seqs"],
        "queries_per_seq": cfg["queries_per_seq"],
    }
    rows: list[dict[str, Any]] = []
    per_variant: dict[str, Any] = {}
    for name, shift, boundary in VARIANTS:
        res = [
            evaluate_theorem2(seed=s, d=cfg["d"], sigma=sigma, kv_shift=shift, boundary=boundary, **common)
            for s in range(seeds)
        ]
        per_variant[name] = res
        base = {"model": name, "layers": 1, "kv_shift": shift}
        m, sd = mean_std(r["accuracy"] for r in res)
        rows.append({**base, "metric": "induction accuracy", "mean": m, "std": sd, "seeds": seeds})
        m, sd = mean_std(r["first_accuracy"] for r in res)
        rows.append(
            {**base, "metric": "accuracy at first induction position", "mean": m, "std": sd, "seeds": seeds}
        )
        if not shift:
            m, sd = mean_std(r["copy_current_rate"] for r in res)
            rows.append({**base, "metric": "copy-current-token rate", "mean": m, "std": sd, "seeds": seeds})
    ih_task = InductionTask(
        vocab_size=cfg["vocab_size"],
        seq_len=min(cfg["seq_len"], 48 if quick else 96),
        pool_size=min(cfg["pool_size"], 16),
        reserved=cfg["reserved"],
        seed=0,
    )
    deviations: dict[str, list[dict[str, float]]] = {}
    for name, _, boundary in VARIANTS[:2]:
        devs = [
            max_ih_deviation(seed=s, d=cfg["d"], sigma=sigma, slope=slope, task=ih_task, boundary=boundary)
            for s in range(seeds)
        ]
        deviations[name] = devs
        for where, label in (("induction", "induction positions"), ("all", "all positions L>=3")):
            m, sd = mean_std(dv[where] for dv in devs)
            rows.append(
                {
                    "model": name,
                    "layers": 1,
                    "kv_shift": True,
                    "metric": f"max |head - IH(X)| at {label}",
                    "mean": m,
                    "std": sd,
                    "seeds": seeds,
                }
            )
    sweep_n = max(8, cfg["num_seqs"] // 2)
    sweep_common = {**common, "num_seqs": sweep_n}
    sweep_sigma = {
        name: [
            evaluate_theorem2(seed=0, d=cfg["d"], sigma=sg, kv_shift=shift, boundary=b, **sweep_common)[
                "accuracy"
            ]
            for sg in cfg["sigmas"]
        ]
        for name, shift, b in VARIANTS
    }
    sweep_d = {
        name: [
            evaluate_theorem2(seed=0, d=dd, sigma=sigma, kv_shift=shift, boundary=b, **sweep_common)[
                "accuracy"
            ]
            for dd in cfg["dims"]
        ]
        for name, shift, b in VARIANTS
    }
    out = Path(out_dir)
    plot = out / "theorem2.png"
    _plot(plot, cfg["sigmas"], sweep_sigma, cfg["dims"], sweep_d, cfg)
    notes = [
        "No training: W_Q = W_K = W_V = W_O = I, key shift (0, 1), value shift (1, 0), ALiBi slope m, temperature sigma.",
        "Accuracy = nearest embedding of the head output equals the successor of the latest earlier occurrence of "
        "the current token, at up to queries_per_seq induction positions per sequence (always the first one).",
        "'s in [2, L-1]' masks the two boundary keys that Definition 1 excludes; it then equals IH(X) to rounding.",
        "Vanilla = same weights with the shift off (key and value (1, 0)): it copies the current token.",
    ]
    extra = {
        "per_variant": per_variant,
        "ih_deviation": deviations,
        "sweep_sigma": {"sigmas": cfg["sigmas"], "accuracy": sweep_sigma, "num_seqs": sweep_n},
        "sweep_d": {"dims": cfg["dims"], "accuracy": sweep_d, "num_seqs": sweep_n},
        "plot": plot.name,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    payload = write_results(out, "theorem2", rows, cfg, extra)
    md = markdown_table(rows, ROW_COLUMNS)
    if verbose:
        print(md)
    return {**payload, "markdown": md, "out_dir": str(out)}
