"""`kvshift reproduce lr-robustness`: the paper's Fig. 5 claim that KV shifting trains at learning rates where
vanilla attention diverges, on two workloads, paired (same seed = same shared weights and data order).

- ``lm``: the language-model comparison of `kvshift compare` (2 layers, d 128, the stdlib BPE corpus),
  shortened; metric: final validation loss on a fixed sample drawn from every val document.
- ``induction``: the toy induction task with 1-layer models (the lab's toy workload); metric: induction
  accuracy.

A run *diverged* when its training loss became non-finite (the trainer stops it) or ended above its
starting value. Per learning rate: divergence counts, final metric mean +- std over the seeds that did
not diverge, and the paired KV - vanilla difference over seeds where neither diverged.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

__all__ = ["run_lr_robustness", "plot_lr_robustness", "LR_GRID"]

LR_GRID = {"quick": [1e-2, 1e-1, 3e-1, 1.0], "full": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]}
ARMS = (("vanilla", False), ("kvshift", True))


def _lm_runs(lrs, seeds, out: Path, quick: bool, steps: int | None, data: str | None, bar) -> list[dict]:
    from ..train.config import apply_overrides
    from ..train.loop import TrainingDiverged, train
    from ..train.recipes import get_recipe

    rows = []
    for lr in lrs:
        for seed in range(seeds):
            for arm, kv in ARMS:
                cfg = get_recipe("stdlib-quick")
                sets = [f"optim.lr={lr}", f"model.kv_shift={kv}", f"seed={seed}", "progress=false",
                        "tensorboard=false", "ckpt_every=0", "log_every=1"]
                if quick:
                    sets += ["steps=60", "optim.warmup_steps=10", "eval_every=60", "data.val_tokens=16384"]
                if steps is not None:
                    sets += [f"steps={steps}", f"eval_every={steps}", f"optim.warmup_steps={max(1, steps // 6)}"]
                if data is not None:
                    sets += ["data.source=prepared", f"data.path={data}"]
                cfg = apply_overrides(cfg, sets)
                cfg.name = f"lr-{arm}"
                run_dir = out / "runs" / f"lm-{arm}-lr{lr:g}-seed{seed}"
                try:
                    summary = train(cfg, run_dir)
                    losses = summary["losses"]
                    row = {"val_loss": summary["val_loss"], "nonfinite": False,
                           "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:])}
                except TrainingDiverged:
                    row = {"val_loss": None, "nonfinite": True, "first_loss": None, "last_loss": None}
                for sub in ("checkpoints", "final"):  # keep metrics and summary, not 40 copies of weights
                    shutil.rmtree(run_dir / sub, ignore_errors=True)
                row["diverged"] = row["nonfinite"] or not (row["last_loss"] < row["first_loss"])
                rows.append({"workload": "lm", "arm": arm, "lr": lr, "seed": seed, "metric": row["val_loss"], **row})
                bar.update(1)
                bar.set_postfix(workload="lm", lr=f"{lr:g}", arm=arm, seed=seed)
    return rows


def _toy_runs(lrs, seeds, quick: bool, steps: int | None, bar) -> list[dict]:
    from ..tasks.induction import InductionTask, induction_accuracy
    from .toy_train import ModelSpec, RunSpec, train_on_task

    task = InductionTask(vocab_size=128, seq_len=64, pool_size=32, reserved=11, seed=0)
    run_steps = steps if steps is not None else (150 if quick else 1000)
    eval_batch = task.sample(500, 987_654)
    rows = []
    for lr in lrs:
        run = RunSpec(steps=run_steps, batch_size=32, warmup_steps=max(1, run_steps // 10), eval_every=run_steps,
                      lr=lr, curve_eval_size=250)
        for seed in range(seeds):
            for arm, kv in ARMS:
                spec = ModelSpec(f"{arm}-1L", 1, kv, 64, 2)
                res = train_on_task(task, spec, run, induction_accuracy, seed=seed, eval_batch=eval_batch)
                losses = res["loss_curve"]
                nonfinite = bool(res["diverged"])
                first, last = losses[0], losses[-1]
                diverged = nonfinite or not (math.isfinite(last) and last < first)
                rows.append({"workload": "induction", "arm": arm, "lr": lr, "seed": seed,
                             "metric": None if nonfinite else res["final"], "nonfinite": nonfinite,
                             "diverged": diverged, "first_loss": first, "last_loss": last})
                bar.update(1)
                bar.set_postfix(workload="induction", lr=f"{lr:g}", arm=arm, seed=seed)
    return rows


def _summarise(rows: list[dict], workload: str, lower_is_better: bool) -> list[dict]:
    from ..report import mean_std
    from .compare import paired_by_seed

    out = []
    for lr in sorted({r["lr"] for r in rows if r["workload"] == workload}):
        by_arm = {arm: {r["seed"]: r for r in rows if r["workload"] == workload and r["lr"] == lr and r["arm"] == arm}
                  for arm, _ in ARMS}
        for arm, _ in ARMS:
            runs = list(by_arm[arm].values())
            ok = [r["metric"] for r in runs if not r["diverged"] and r["metric"] is not None]
            mean, std = mean_std(ok) if ok else (None, None)
            row = {"workload": workload, "lr": lr, "model": arm, "seeds": len(runs),
                   "diverged": sum(r["diverged"] for r in runs), "nonfinite": sum(r["nonfinite"] for r in runs),
                   "mean": mean, "std": std}
            if arm == "kvshift":  # seeds where neither arm diverged
                kept = {a: {s: r for s, r in by_arm[a].items() if not r["diverged"]} for a, _ in ARMS}
                st = paired_by_seed(kept["vanilla"], kept["kvshift"], lower_is_better)
                if st:
                    row.update({"paired_diff": st["diff"], "paired_std": st["diff_std"], "pairs": st["pairs"],
                                "p_t": st["p_t"], "p_signflip": st["p_signflip"], "kv_better_in": st["better_in"]})
            out.append(row)
    return out


def plot_lr_robustness(summary: list[dict], path: Path) -> None:
    """Final metric against the peak LR per workload, vanilla dashed, KV solid, divergences annotated."""
    from ..report import get_pyplot, save_figure

    plt = get_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (workload, label) in zip(axes, (("lm", "final val loss (nats/token)"),
                                            ("induction", "induction accuracy"))):
        for arm, style in (("vanilla", "--"), ("kvshift", "-")):
            rows = [r for r in summary if r["workload"] == workload and r["model"] == arm]
            if not rows:
                continue
            xs = [r["lr"] for r in rows if r["mean"] is not None]
            ys = [r["mean"] for r in rows if r["mean"] is not None]
            es = [r["std"] or 0.0 for r in rows if r["mean"] is not None]
            if workload == "induction":  # an accuracy: the +- 1 std bars stay inside [0, 1]
                es = [[min(e, y) for y, e in zip(ys, es)], [min(e, 1.0 - y) for y, e in zip(ys, es)]]
            ax.errorbar(xs, ys, yerr=es, linestyle=style, marker="o", capsize=3, label=arm)
            for r in rows:
                if r["diverged"]:
                    ax.annotate(f"{arm}: {r['diverged']}/{r['seeds']} diverged", (r["lr"], 0.5 if arm == "vanilla"
                                else 0.42), xycoords=("data", "axes fraction"), fontsize=7, ha="right",
                                color="C0" if arm == "vanilla" else "C1")
        ax.set_xscale("log")
        lrs = [r["lr"] for r in summary if r["workload"] == workload]
        if lrs:  # every LR of the sweep shows, diverged ones (no point) with their count
            ax.set_xlim(min(lrs) / 1.6, max(lrs) * 1.6)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(label)
        ax.set_title(f"{workload}: mean +- 1 std over non-diverged seeds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LR robustness (paper Fig. 5: vanilla diverges at lr 1e-2, KV shifting does not)")
    fig.tight_layout()
    save_figure(fig, path)


def run_lr_robustness(quick: bool = True, seeds: int = 5, out_dir: str | Path = "results/lr-robustness",
                      steps: int | None = None, data: str | None = None, lrs: list[float] | None = None) -> dict:
    """Sweep the peak learning rate for vanilla and KV shifting on both workloads; write results.json,
    results.md, config.json and lr_robustness.png into ``out_dir``."""
    from tqdm.auto import tqdm

    from ..report import atomic_write_text, markdown_table
    from .common import prepare_lm_run, write_results
    from .compare import _p

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    lrs = list(lrs) if lrs is not None else LR_GRID["quick" if quick else "full"]
    prepare_lm_run(out, data, "lr-robustness")
    t0 = time.perf_counter()
    with tqdm(total=2 * len(lrs) * seeds * 2, desc="lr-robustness", unit="run", file=sys.stderr,
              dynamic_ncols=True) as bar:
        rows = _lm_runs(lrs, seeds, out, quick, steps, data, bar) + _toy_runs(lrs, seeds, quick, steps, bar)
    summary = _summarise(rows, "lm", True) + _summarise(rows, "induction", False)
    for r in summary:  # the common row fields of every results.json
        lm = r["workload"] == "lm"
        r.update(layers=2 if lm else 1, kv_shift=r["model"] == "kvshift",
                 metric="val_loss" if lm else "induction accuracy")
    wall = time.perf_counter() - t0
    config = {"experiment": "lr-robustness", "mode": "quick" if quick else "full", "seeds": seeds, "lrs": lrs,
              "lm": "recipe stdlib-quick (2 layers, d 128, T 128, batch 8)" + (", 60 steps, warm-up 10, val sample "
                                                                                "16k tokens" if quick else ""),
              "induction": "InductionTask(vocab 128, T 64, pool 32), 1-layer d 64 models, "
                           f"{steps or (150 if quick else 1000)} steps, warm-up 10%, eval on 500 held-out sequences",
              "diverged": "training loss non-finite, or its last value not below its first"}
    notes = [f"{seeds} seeds per (arm, lr); one seed = the same shared initial weights and data order in both arms",
             "paired_diff: KV - vanilla of the final metric over seeds where neither arm diverged "
             "(lm: val loss, lower is better; induction: accuracy, higher is better)",
             "paper claim (Fig. 5, 1.5B-scale models): vanilla diverges at lr 1e-2, KV shifting does not",
             f"total wall time {wall:.0f} s"]
    cols = ["workload", "lr", "model", "seeds", "diverged", "nonfinite", "mean", "std", "paired_diff", "paired_std",
            "p_t", "p_signflip", "kv_better_in"]
    payload = write_results(out, "lr-robustness", summary, config, extra={"runs": rows, "notes": notes,
                                                                          "seconds": wall}, columns=cols)
    shown = [{**r, **{k: _p(r[k]) for k in ("p_t", "p_signflip") if k in r}} for r in summary]
    atomic_write_text(out / "results.md", "# lr-robustness\n\n" + markdown_table(shown, cols) + "\n"
                      + "\n".join(f"- {n}" for n in notes) + "\n")
    plot_lr_robustness(summary, out / "lr_robustness.png")
    return payload
