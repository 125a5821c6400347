"""Longer runs of single seeds of the main job's 1-layer KV-shifting model (same protocol as
`kvshift reproduce induction`, more steps): does a seed that missed 90 % in 400 steps get there later?

    .venv/bin/python scripts/induction_seed_runs.py --seeds 2,9 --steps 1000 --out results/induction-long-seeds

Writes OUT/results.json and OUT/results.md (per seed: initial draw, learned weights, curve, step reaching 90 %).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from kvshift.experiments.runner import EVAL_SEED, seed_table
from kvshift.experiments.toy import induction_protocol
from kvshift.experiments.toy_train import ModelSpec, train_on_task
from kvshift.report import atomic_write_text, environment
from kvshift.tasks.induction import induction_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="2,9", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: %(default)s)")
    parser.add_argument("--out", default="results/induction-long-seeds", help="output folder (default: %(default)s)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.steps < 1 or any(s < 0 for s in seeds):
        parser.error("--steps must be >= 1 and --seeds >= 0")
    # the quick protocol of kvshift reproduce induction, with --steps steps
    task, hidden, heads, lr_grid, run, eval_size = induction_protocol(quick=True)
    eval_batch = task.sample(eval_size, EVAL_SEED)
    run = replace(run, steps=args.steps, lr=lr_grid[0])
    spec = ModelSpec("kvshift-1L", 1, True, hidden, heads)
    results = []
    for s in seeds:
        r = train_on_task(task, spec, run, induction_accuracy, seed=s, eval_batch=eval_batch)
        r.pop("model_obj")
        results.append(r)
        print(f"seed {s}: final {r['final']:.3f}", flush=True)
    table = seed_table(results, 0.9)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": {"task": repr(task), "run": run.__dict__, "model": spec.__dict__}, "seeds": table,
               "runs": results, "environment": environment()}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2) + "\n")
    lines = [f"# kvshift-1L on the induction task, {args.steps} steps", "",
             "| seed | initial (alpha1, beta1) per head | learned (alpha1, beta1) per head | final | step reaching 90% |",
             "|---|---|---|---|---|"]
    for row, r in zip(table, results):
        k, v = r["shift_weights"]["0"]
        learned = ", ".join(f"({kh[0]:.2f}, {vh[0]:.2f})" for kh, vh in zip(k, v))
        start = ", ".join(f"({a:.2f}, {b:.2f})" for a, b in row["initial_alpha1_beta1"])
        step = row["steps_to_threshold"] if row["steps_to_threshold"] is not None else "not reached"
        curve = ", ".join(f"{t}: {m:.2f}" for t, m in r["curve"] if t % 100 == 0)
        lines += [f"| {row['seed']} | {start} | {learned} | {row['final']:.3f} | {step} |"]
        lines += [f"|  | curve (every 100 steps): {curve} | | | |"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
