"""`kvshift compare`: vanilla vs KV shifting, paired for real (same seed = same shared weights and data
order), over many seeds, validated on the whole val split, with paired statistics, probes and plots."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

__all__ = ["compare", "paired_stats", "paired_by_seed", "ARM_VANILLA"]

ARM_VANILLA = "vanilla"


def _arm_name(init: str) -> str:
    return "kvshift" if init == "paper" else f"kvshift-{init}"


def paired_stats(a: list[float], b: list[float]) -> dict:
    """Paired comparison of ``b - a``: mean, std, two-sided paired t-test p and exact sign-flip p.

    With n pairs the sign-flip test can never go below ``2 / 2**n`` (0.25 for 3 seeds, 0.03 for 6).
    """
    if len(a) != len(b) or not a:
        raise ValueError("paired_stats needs two equally long, non-empty lists")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    p_t = None
    if n > 1 and std > 0:
        from scipy import stats

        p_t = float(stats.ttest_rel(b, a).pvalue)
    flips = [sum(x * (1 if (m >> i) & 1 else -1) for i, x in enumerate(d)) for m in range(2 ** n)] if n <= 16 else []
    p_perm = (sum(abs(s) >= abs(sum(d)) - 1e-12 for s in flips) / len(flips)) if flips else None
    return {"mean_diff": mean, "std_diff": std, "n": n, "p_value_t": p_t, "p_value_permutation": p_perm,
            "kvshift_better_in": sum(x < 0 for x in d)}


def paired_by_seed(a: dict, b: dict, lower_is_better: bool) -> dict:
    """:func:`paired_stats` of ``b - a`` over the seeds where both runs have a metric (``{seed: run}``
    dicts whose runs carry ``"metric"``): ``diff``, ``diff_std``, ``pairs``, ``p_t``, ``p_signflip`` and
    ``better_in`` (seeds where ``b`` beat ``a``); empty when no seed pairs up."""
    seeds = [s for s in a if s in b and a[s]["metric"] is not None and b[s]["metric"] is not None]
    if not seeds:
        return {}
    st = paired_stats([a[s]["metric"] for s in seeds], [b[s]["metric"] for s in seeds])
    sign = 1 if lower_is_better else -1  # "better" is a lower loss or a higher accuracy
    return {"diff": st["mean_diff"], "diff_std": st["std_diff"], "pairs": st["n"], "p_t": st["p_value_t"],
            "p_signflip": st["p_value_permutation"],
            "better_in": sum(sign * (b[s]["metric"] - a[s]["metric"]) < 0 for s in seeds)}


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append((rec["step"], rec["val_loss"]))
    return curve


def _p(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2g}" if value < 0.01 else f"{value:.2f}"


def _val_words(validation: dict) -> str:
    return "the whole val split" if validation.get("mode") == "whole split" else "a fixed sample of the val split"


def _probe(model, cfg, val_ds) -> dict:
    """Copying probes on held-out real text (see :mod:`kvshift.eval.probes`)."""
    from ..data.packing import validation_batches, validation_rows
    from ..eval.probes import repeated_text_loss, seen_bigram_loss

    span = max(8, min(64, cfg.data.seq_len // 2))
    rows = validation_rows(val_ds, cfg.data.seq_len, 16 * cfg.data.seq_len, seed=0)
    out = repeated_text_loss(model, val_ds, span=span, batch=16, seed=0)
    out.update(seen_bigram_loss(model, validation_batches(val_ds, cfg.data.val_batch_size, rows)))
    return out


METRICS = (  # (key in a run entry, row label)
    ("val_loss", "val_loss"),
    ("val_bpb", "val_bpb"),
    ("second_copy_loss", "repeated real text: loss on the 2nd copy"),
    ("seen_bigram_loss", "loss after an already-seen bigram"),
    ("other_loss", "loss on other targets"),
)


def compare(recipe: str, seeds: int, out: str | Path, data: str | None = None, overrides: list[str] = (),
            inits: list[str] | tuple[str, ...] = ("paper", "identity")) -> dict:
    """Train every arm (vanilla and one KV-shifting arm per ``inits`` entry) for ``seeds`` seeds; write
    ``results.{json,md}``, ``config.json``, ``val_loss.png`` and one run folder per (arm, seed) under ``out``."""
    from tqdm.auto import tqdm

    from ..eval.heads import shift_table
    from ..models import KVShiftForCausalLM
    from ..models.configuration import KV_SHIFT_INITS
    from ..report import atomic_write_text, mean_std
    from ..train.config import apply_overrides, config_to_dict
    from ..train.loop import load_datasets, train
    from ..train.recipes import get_recipe
    from .common import write_results

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    inits = list(inits)
    if not inits or any(i not in KV_SHIFT_INITS for i in inits) or len(set(inits)) != len(inits):
        raise ValueError(f"--inits must be distinct values of {KV_SHIFT_INITS}, got {inits}")
    out = Path(out)
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise FileExistsError(f"{out} already holds comparison runs; choose another --out or remove {out / 'runs'} "
                              "(nothing was overwritten)")
    base = apply_overrides(get_recipe(recipe), list(overrides))
    if data is not None:
        base.data.path = data
    arms = {ARM_VANILLA: None, **{_arm_name(i): i for i in inits}}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    _, val_ds = load_datasets(base)
    validation: dict = {}
    t0 = time.perf_counter()
    with tqdm(total=len(arms) * seeds * base.steps, desc="compare", unit="step", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for seed in range(seeds):
            for arm, init in arms.items():
                cfg = apply_overrides(get_recipe(recipe), list(overrides))
                if data is not None:
                    cfg.data.path = data
                cfg.seed, cfg.progress, cfg.name = seed, False, f"{recipe}-{arm}"
                cfg.model.kv_shift = init is not None
                if init is not None:
                    cfg.model.kv_shift_init = init
                run_dir = out / "runs" / f"{arm}-seed{seed}"
                summary = train(cfg, run_dir)
                bar.update(cfg.steps)
                bar.set_postfix(arm=arm, seed=seed, val_loss=f"{summary['val_loss']:.4f}")
                validation = summary.get("validation", validation)
                model = KVShiftForCausalLM.from_pretrained(summary["final_dir"]).eval()
                entry = {"seed": seed, "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
                         "val_tokens": summary["val_tokens"], "tokens": summary["tokens"],
                         "seconds": summary["seconds"], "curve": _val_curve(run_dir), **_probe(model, cfg, val_ds)}
                if init is not None:
                    entry["shift"] = shift_table(model)
                runs[arm].append(entry)
    wall = time.perf_counter() - t0

    rows = []
    for arm, init in arms.items():
        for key, label in METRICS:
            m, s = mean_std([r[key] for r in runs[arm]])
            rows.append({"model": arm, "layers": base.model.num_hidden_layers, "kv_shift": init is not None,
                         "metric": label, "mean": m, "std": s, "seeds": seeds})
    paired = {}
    for arm in arms:
        if arm == ARM_VANILLA:
            continue
        paired[arm] = {key: paired_stats([r[key] for r in runs[ARM_VANILLA]], [r[key] for r in runs[arm]])
                       for key, _ in METRICS}
    tokens = runs[ARM_VANILLA][0]["tokens"]
    notes = [
        f"recipe {recipe}: {base.model.num_hidden_layers} layers, d {base.model.hidden_size}, T {base.data.seq_len}, "
        f"{base.steps} steps, {tokens:,} training tokens per run, {seeds} seeds per arm; one seed = the same "
        "initialisation of every shared weight and the same data order in every arm",
        f"validation: {_val_words(validation)} ({runs[ARM_VANILLA][0]['val_tokens']:,} target "
        f"tokens, {validation.get('docs_covered', '?')} of {validation.get('split_docs', '?')} documents)",
    ]
    for arm, st in paired.items():
        v = st["val_loss"]
        notes.append(f"{arm} - vanilla, val loss: {v['mean_diff']:+.4f} +- {v['std_diff']:.4f}; t-test p = "
                     f"{_p(v['p_value_t'])}, exact sign-flip p = {_p(v['p_value_permutation'])}; lower in "
                     f"{v['kvshift_better_in']} of {seeds} seeds")
    notes += ["paper claim: KV shifting gives lower loss at equal tokens at every scale it tried (1.5B-19B)",
              f"total wall time {wall:.0f} s"]
    payload = write_results(out, "compare", rows,
                            {"recipe": recipe, "seeds": seeds, "inits": inits, "data": data,
                             "overrides": list(overrides), "config": config_to_dict(base)},
                            extra={"paired": paired, "paired_val_loss": paired[_arm_name(inits[0])]["val_loss"],
                                   "runs": runs, "validation": validation, "wall_seconds": wall,
                                   "shift_tables": {a: [r["shift"]["table"] for r in runs[a]]
                                                    for a in arms if a != ARM_VANILLA},
                                   "notes": notes})
    md = (out / "results.md").read_text()
    md += "\n## Paired differences (arm - vanilla, same seed)\n\n| arm | metric | mean diff | std | " \
          "t-test p | sign-flip p | arm lower in |\n|---|---|---|---|---|---|---|\n"
    for arm, st in paired.items():
        for key, label in METRICS:
            s = st[key]
            md += (f"| {arm} | {label} | {s['mean_diff']:+.4f} | {s['std_diff']:.4f} | {_p(s['p_value_t'])} | "
                   f"{_p(s['p_value_permutation'])} | {s['kvshift_better_in']} of {s['n']} |\n")
    md += f"\n## Per seed (val loss, {_val_words(validation)})\n\n| seed | " + " | ".join(arms) + " |\n|" + "---|" * (
        len(arms) + 1) + "\n"
    for i in range(seeds):
        md += f"| {i} | " + " | ".join(f"{runs[a][i]['val_loss']:.4f}" for a in arms) + " |\n"
    for arm in arms:
        if arm == ARM_VANILLA:
            continue
        md += (f"\n## Learned shift weights of `{arm}` (Table 4 style, per seed)\n\n| seed | k cur / v cur | "
               "k cur / v prev | k prev / v cur | k prev / v prev | off the a1+a2=1 line | with a negative weight |"
               "\n|---|---|---|---|---|---|---|\n")
        for r in runs[arm]:
            t, s = r["shift"]["table"], r["shift"]
            md += (f"| {r['seed']} | {t['key_current/value_current']} | {t['key_current/value_previous']} | "
                   f"{t['key_previous/value_current']} | {t['key_previous/value_previous']} | "
                   f"{s['off_convex_line']} / {s['num_heads']} | {s['with_negative_weight']} |\n")
    atomic_write_text(out / "results.md", md)
    from ..report import save_figure

    save_figure(plot_compare(runs, recipe), out / "val_loss.png")
    return payload


def plot_compare(runs: dict[str, list[dict]], recipe: str):
    """Validation-loss curves per arm (mean, shaded +- 1 std over seeds) and the paired differences to
    vanilla. Returns the figure."""
    import numpy as np

    from ..report import get_pyplot

    plt = get_pyplot()
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = {}
    for arm, rs in runs.items():
        steps = np.array([s for s, _ in rs[0]["curve"]])
        vals = np.array([[v for _, v in r["curve"]] for r in rs if len(r["curve"]) == len(steps)])
        curves[arm] = (steps, vals)
        m, s = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(steps))
        ax.plot(steps, m, marker="o", ms=3, label=f"{arm} ({len(vals)} seeds)")
        ax.fill_between(steps, m - s, m + s, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss, mean ± 1 std over seeds ({recipe})")
    ax.grid(alpha=0.3)
    ax.legend()
    steps, van = curves[ARM_VANILLA]
    for arm, (st, vals) in curves.items():
        if arm == ARM_VANILLA or vals.shape != van.shape:
            continue
        d = vals - van
        m, s = d.mean(0), d.std(0, ddof=1) if len(d) > 1 else np.zeros(len(st))
        dx.plot(st, m, marker="o", ms=3, label=arm)
        dx.fill_between(st, m - s, m + s, alpha=0.2)
    dx.axhline(0, color="k", lw=0.8)
    dx.set_xlabel("step")
    dx.set_ylabel("paired difference, arm - vanilla (nats)")
    dx.set_title("same seed, same init and data (below 0: KV shifting lower)")
    dx.grid(alpha=0.3)
    dx.legend()
    fig.tight_layout()
    return fig
