"""Run one synthetic-task experiment: models x seeds (x an LR grid), then rows, curves and a plot."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ..eval.heads import head_scores, shift_table
from ..report import get_pyplot, mean_std, save_figure
from .common import write_results
from .toy_train import ModelSpec, RunSpec, steps_to_reach, train_on_task

__all__ = ["EVAL_SEED", "run_task_experiment", "analysis_markdown", "plot_curves", "seed_table"]

EVAL_SEED = 987_654  # the held-out evaluation batch's seed; training batches use seeds 10_000+


def _pick_lr(task, spec, run, metric, eval_batch, lr_grid, bar) -> tuple[float, dict]:
    """Seed-0 run per LR of the grid; the LR with the best final metric wins (ties: smaller LR)."""
    best = None
    for lr in lr_grid:
        res = train_on_task(task, spec, replace(run, lr=lr), metric, seed=0, eval_batch=eval_batch, progress=bar)
        if best is None or res["final"] > best[1]["final"] + 1e-9:
            best = (lr, res)
    return best


def run_task_experiment(
    name: str,
    task,
    specs: list[ModelSpec],
    run: RunSpec,
    metric: Callable,
    metric_name: str,
    *,
    seeds: int,
    lr_grid: list[float],
    out_dir: str | Path,
    eval_size: int,
    config: dict,
    threshold: float | None = 0.9,
    head_vocab: tuple[int, int] | None = None,
    notes: list[str] | None = None,
    extra_eval: Callable | None = None,
    figure: str | None = None,
    model_seeds: dict[str, int] | None = None,
) -> dict:
    """Train every spec for ``seeds`` seeds and write results.json / results.md / config.json / curves.png.

    The LR of each model is picked from ``lr_grid`` on seed 0 (the selection run is that seed's result);
    seeds 1.. reuse the chosen LR. All models see the same data for the same seed. ``figure`` names the
    paper figure the plot reproduces (its title says so). ``model_seeds`` gives some models (by name) another
    number of seeds than ``seeds``; seed ``s`` is the same run whatever the count, so rows stay paired.
    """
    model_seeds = dict(model_seeds or {})
    unknown = sorted(set(model_seeds) - {spec.name for spec in specs})
    if unknown:
        raise ValueError(f"model_seeds names models that the experiment does not train: {unknown}")
    if any(int(n) < 1 for n in model_seeds.values()):
        raise ValueError(f"model_seeds must be >= 1 per model, got {model_seeds}")
    out = Path(out_dir)
    eval_batch = task.sample(eval_size, EVAL_SEED)
    n_seeds = {spec.name: model_seeds.get(spec.name, seeds) for spec in specs}
    total = sum(run.steps * (len(lr_grid) + n_seeds[spec.name] - 1) for spec in specs)
    rows, runs, analysis = [], [], {}
    with tqdm(total=total, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for spec in specs:
            lr, first = _pick_lr(task, spec, run, metric, eval_batch, lr_grid, bar)
            results = [first] + [
                train_on_task(task, spec, replace(run, lr=lr), metric, seed=s, eval_batch=eval_batch, progress=bar)
                for s in range(1, n_seeds[spec.name])
            ]
            finals = [r["final"] for r in results]
            mean, std = mean_std(finals)
            row = {"model": spec.name, "layers": spec.layers, "kv_shift": spec.kv_shift, "metric": metric_name,
                   "mean": mean, "std": std, "seeds": n_seeds[spec.name], "lr": lr, "hidden_size": spec.hidden_size,
                   "params": sum(p.numel() for p in first["model_obj"].parameters())}
            if threshold is not None:
                reach = [steps_to_reach(r["curve"], threshold) for r in results]
                row[f"steps_to_{int(threshold * 100)}pct"] = (
                    mean_std([s for s in reach if s is not None])[0] if all(s is not None for s in reach) else None)
                row["runs_reaching"] = sum(s is not None for s in reach)
            if extra_eval is not None:
                row.update(extra_eval(results))
            rows.append(row)
            model = first["model_obj"]
            if spec.kv_shift:
                analysis[spec.name] = {"shift": shift_table(model)}
                if threshold is not None and spec.layers == 1 and all("0" in r["initial_shift_weights"] for r in results):
                    analysis[spec.name]["seeds"] = seed_table(results, threshold)
            elif head_vocab is not None:
                analysis[spec.name] = {"head_scores": head_scores(model, head_vocab[1], low=head_vocab[0])}
            for r in results:
                runs.append({k: v for k, v in r.items() if k != "model_obj"})
    from .common import ROW_COLUMNS

    columns = [*ROW_COLUMNS, "lr", *(c for c in rows[0] if c.startswith("steps_to_") or c == "runs_reaching"),
               "params"]
    payload = write_results(out, name, rows, config,
                            extra={"runs": runs, "analysis": analysis, "notes": notes or []}, columns=columns)
    kv = {spec.name: spec.kv_shift for spec in specs}
    fig = plot_curves(runs, kv, title=f"{name} (paper {figure})" if figure else name, metric_name=metric_name,
                      threshold=threshold, bounds=(0.0, 1.0))
    save_figure(fig, out / "curves.png")
    md = (out / "results.md").read_text()
    md += "\n" + analysis_markdown(analysis)
    from ..report import atomic_write_text

    atomic_write_text(out / "results.md", md)
    return payload


def seed_table(results: list[dict], threshold: float) -> list[dict]:
    """Per seed of a 1-layer KV-shifting model: each head's initial (key, value) current-token weights
    (alpha1, beta1), the distance of the head that starts nearest the induction solution (alpha1, beta1) =
    (0, 1) (key = previous token, value = current; paper Fig. 2), the final metric and the step it first
    reached ``threshold``."""
    rows = []
    for r in results:
        k, v = r["initial_shift_weights"]["0"]
        starts = [(kh[0], vh[0]) for kh, vh in zip(k, v)]
        rows.append({"seed": r["seed"], "initial_alpha1_beta1": starts,
                     "nearest_start": min((a**2 + (1 - b) ** 2) ** 0.5 for a, b in starts),
                     "final": r["final"], "steps_to_threshold": steps_to_reach(r["curve"], threshold)})
    return rows


def analysis_markdown(analysis: dict) -> str:
    """Learned-shift tables for KV runs, head scores for vanilla runs (seed 0 of each model)."""
    lines = []
    for model, a in analysis.items():
        if "shift" in a:
            s = a["shift"]
            lines += [f"## Learned shift weights: {model} (seed 0)", "",
                      "| layer | head | alpha1 (key, current) | alpha2 (key, previous) | beta1 (value, current) "
                      "| beta2 (value, previous) |", "|---|---|---|---|---|---|"]
            lines += [f"| {h['layer']} | {h['head']} | {h['alpha1']:.3f} | {h['alpha2']:.3f} | {h['beta1']:.3f} "
                      f"| {h['beta2']:.3f} |" for h in s["heads"]]
            t = s["table"]
            lines += ["", "| | value leans current | value leans previous |", "|---|---|---|",
                      f"| key leans current | {t['key_current/value_current']} | {t['key_current/value_previous']} |",
                      f"| key leans previous | {t['key_previous/value_current']} | {t['key_previous/value_previous']} |",
                      "", f"{s['off_convex_line']} of {s['num_heads']} heads left the alpha1+alpha2 = 1 "
                      f"(or beta) line by > 0.05; {s['with_negative_weight']} have a negative weight.", ""]
        if "seeds" in a:
            lines += [f"## Seeds of {model}: initial draw and outcome", "",
                      "Initial (alpha1, beta1) per head; nearest start: the distance of the head starting nearest "
                      "the induction solution (0, 1) (paper Fig. 2: heads near it learn induction fastest).", "",
                      "| seed | initial (alpha1, beta1) per head | nearest start | final | step reaching 90% |",
                      "|---|---|---|---|---|"]
            for r in a["seeds"]:
                heads = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in r["initial_alpha1_beta1"])
                step = r["steps_to_threshold"] if r["steps_to_threshold"] is not None else "not reached"
                lines.append(f"| {r['seed']} | {heads} | {r['nearest_start']:.2f} | {r['final']:.3f} | {step} |")
            lines.append("")
        if "head_scores" in a:
            lines += [f"## Head scores: {model} (seed 0)", "",
                      "| layer | head | previous-token score | induction score |", "|---|---|---|---|"]
            lines += [f"| {h['layer']} | {h['head']} | {h['previous_token_score']:.3f} | {h['induction_score']:.3f} |"
                      for h in a["head_scores"]]
            lines.append("")
    return "\n".join(lines)


def plot_curves(runs: list[dict], kv_shift: dict[str, bool], *, title: str, metric_name: str,
                threshold: float | None = None, bounds: tuple[float, float] | None = None):
    """Mean curve per model over its seeds (at the chosen LR), shaded +- 1 std (clipped to ``bounds``); a
    vanilla model and the KV-shifting one of its size share a colour (vanilla dashed); a dotted line marks
    ``threshold`` (the "steps to reach" level). Returns the figure."""
    import numpy as np

    from .common import model_styles

    plt = get_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_model: dict[str, list[dict]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    styles = model_styles({m: kv_shift.get(m, m.startswith("kvshift")) for m in by_model})
    n_seeds = set()
    for model, rs in by_model.items():
        lr = rs[-1]["lr"]
        rs = [r for r in rs if r["lr"] == lr]  # grid-selection runs at other LRs are left out
        steps = np.array([s for s, _ in rs[0]["curve"]])
        vals = np.array([[v for _, v in r["curve"]] for r in rs if len(r["curve"]) == len(steps)])
        m, s = vals.mean(0), vals.std(0)
        lo, hi = m - s, m + s
        if bounds is not None:
            lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
        ax.plot(steps, m, label=f"{model} (lr {lr:g})", **styles[model])
        ax.fill_between(steps, lo, hi, alpha=0.15, color=styles[model]["color"], linewidth=0)
        n_seeds.add(len(vals))
    if threshold is not None:
        ax.axhline(threshold, color="0.3", linestyle=":", linewidth=1,
                   label=f"{threshold:.0%} (the steps-to-{threshold:.0%} threshold)")
    if bounds is not None:
        ax.set_ylim(bounds[0] - 0.02, bounds[1] + 0.02)
    seeds = "/".join(str(n) for n in sorted(n_seeds))
    ax.set_xlabel("training step")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{title}\nmean over {seeds} seeds; shaded: +- 1 std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
