"""`kvshift reproduce ablations | relatives | scaling`: token-mixing variants under one paired protocol.

Every variant is one :class:`kvshift.KVShiftConfig` (:data:`TOKEN_MIXING_VARIANTS`) and runs on two
workloads, for the same seeds:

- ``lm``: the language-model comparison (the stdlib-quick recipe: 2 layers, d 128, the stdlib BPE corpus;
  60 steps in ``--quick``), metric: final validation loss on a fixed 16k-token sample drawn from every val
  document (lower is better);
- ``induction``: the toy induction task with **1-layer** models (d 64, 2 heads, 400 steps at lr 3e-3, the
  protocol of ``reproduce induction``), metric: induction accuracy on 1,000 held-out sequences.

A seed fixes the shared initial weights (every variant draws its mixing weights from a peeked generator,
tested) and the data order, so each variant is compared with vanilla and with the paper's KV shift seed by
seed: mean +- std over seeds, the paired difference with a paired t-test and an exact sign-flip test.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

from .common import prepare_lm_run

__all__ = ["run_ablations", "run_relatives", "run_scaling", "extra_flops_per_token", "ABLATIONS", "RELATIVES"]

ABLATIONS = ["vanilla", "kv", "k", "v", "qkv", "kv-gate", "kv-clamp", "kv-w3"]
RELATIVES = ["vanilla", "kv", "kv-w3", "kv-w4", "kv-channel", "kv-channel-w3", "kv-channel-w4", "canon-b", "primer",
             "smear"]
LM_QUICK = ["steps=60", "optim.warmup_steps=10", "eval_every=60", "data.val_tokens=16384"]
TOY_STEPS = {"quick": 400, "full": 3000}
EXPECTED_FULL_TIME = {
    "ablations": "about 1 h on one GPU (8 variants x 3 seeds; LM: the stdlib-small recipe; toy: 3,000 steps)",
    "relatives": "about 1.5 h on one GPU (10 variants x 3 seeds)",
    "scaling": "about 3-4 h on one H100-class GPU (4 LM sizes up to d 512 x 8 layers, 2 arms, 3 seeds, 20 tokens "
               "per non-embedding parameter: up to 514M tokens, so bring a big corpus with --data)",
}


def _variant(name: str) -> tuple[bool, dict]:
    from ..models.configuration import TOKEN_MIXING_VARIANTS

    if name not in TOKEN_MIXING_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(TOKEN_MIXING_VARIANTS)}")
    fields = dict(TOKEN_MIXING_VARIANTS[name])
    return bool(fields.pop("kv_shift", True)), fields


def extra_flops_per_token(config) -> int:
    """Floating-point operations per token that the token mixers add to the vanilla model's forward pass
    (multiplies and adds of the convolutions, the residual add, the smear's gate), from the config."""
    total = 0
    for i in range(config.num_hidden_layers):
        if not config.layer_has_kv_shift(i):
            continue
        W = config.kv_shift_window
        for t in config.kv_shift_targets:
            heads = config.num_attention_heads if t == "q" else config.num_key_value_heads
            total += (2 * W - 1 + int(config.kv_shift_residual)) * heads * config.head_dim
    if getattr(config, "token_smear", False):
        c = min(24, config.hidden_size)
        total += 2 * c + 2 + 2 * config.hidden_size  # gate dot product, sigmoid and scale, scaled add
    return total


def _lm_cfg(variant: str, seed: int, quick: bool, steps: int | None, data: str | None, size: dict | None = None):
    from ..train.config import apply_overrides
    from ..train.recipes import get_recipe

    kv, fields = _variant(variant)
    cfg = get_recipe("stdlib-quick" if quick else "stdlib-small")
    sets = [f"model.kv_shift={kv}", f"seed={seed}", "progress=false", "tensorboard=false", "ckpt_every=0",
            "log_every=1"] + [f"model.{k}={v}" for k, v in fields.items()]
    if quick:
        sets += LM_QUICK
    for k, v in (size or {}).items():
        sets.append(f"{k}={v}")
    if steps is not None:
        sets += [f"steps={steps}", f"eval_every={steps}", f"optim.warmup_steps={max(1, steps // 6)}"]
    if data is not None:
        sets += ["data.source=prepared", f"data.path={data}"]
    cfg = apply_overrides(cfg, sets)
    cfg.name = f"{variant}-seed{seed}"
    return cfg


def _lm_run(variant: str, seed: int, out: Path, tag: str, quick: bool, steps, data, size=None) -> dict:
    from ..models import KVShiftConfig
    from ..train.loop import TrainingDiverged, train

    cfg = _lm_cfg(variant, seed, quick, steps, data, size)
    run_dir = out / "runs" / f"lm-{tag}-seed{seed}"
    try:
        summary = train(cfg, run_dir)
        metric, diverged = summary["val_loss"], False
    except TrainingDiverged:
        summary, metric, diverged = {}, None, True
    conf = KVShiftConfig.from_pretrained(run_dir / "final") if (run_dir / "final").exists() else None
    params = None
    if conf is not None:
        from ..models import KVShiftForCausalLM

        with __import__("torch").device("meta"):
            params = sum(p.numel() for p in KVShiftForCausalLM(conf).parameters())
    for sub in ("checkpoints", "final"):  # keep metrics and summary, not copies of the weights
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    return {"workload": "lm", "variant": variant, "seed": seed, "metric": metric, "diverged": diverged,
            "params": params, "extra_flops_per_token": extra_flops_per_token(conf) if conf is not None else None,
            "tokens": summary.get("tokens"), "seconds": summary.get("seconds")}


def _toy_setup(quick: bool, steps: int | None):
    from ..tasks.induction import InductionTask
    from .toy_train import RunSpec

    task = InductionTask(vocab_size=128, seq_len=64, pool_size=32, reserved=11, seed=0)
    n = steps if steps is not None else TOY_STEPS["quick" if quick else "full"]
    run = RunSpec(steps=n, batch_size=32, warmup_steps=max(1, n // 10), eval_every=max(1, n // 20), lr=3e-3)
    return task, run, task.sample(1000, 987_654)


def _toy_run(variant: str, seed: int, task, run, eval_batch, layers: int = 1, hidden: int = 64,
             heads: int = 2) -> dict:
    from ..tasks.induction import induction_accuracy
    from .toy_train import ModelSpec, steps_to_reach, train_on_task

    kv, fields = _variant(variant)
    res = train_on_task(task, ModelSpec(variant, layers, kv, hidden, heads, config=fields), run, induction_accuracy,
                        seed=seed, eval_batch=eval_batch)
    model = res["model_obj"]
    return {"workload": "induction", "variant": variant, "seed": seed,
            "metric": None if res["diverged"] else res["final"], "diverged": bool(res["diverged"]),
            "curve": res["curve"], "steps_to_90pct": steps_to_reach(res["curve"], 0.9),
            "params": sum(p.numel() for p in model.parameters()),
            "extra_flops_per_token": extra_flops_per_token(model.config), "seconds": res["seconds"]}


def summarise(runs: list[dict], group: str = "variant") -> list[dict]:
    """One row per (workload, ``group``): mean +- std over seeds and the paired differences against vanilla
    and against the paper's KV shift (``kv``) of the same workload (and size, for scaling)."""
    from ..report import mean_std
    from .compare import paired_by_seed

    out = []
    keys = []
    for r in runs:
        k = (r["workload"], r.get("size"), r[group])
        if k not in keys:
            keys.append(k)
    for workload, size, name in keys:
        def by_seed(n, workload=workload, size=size):
            return {r["seed"]: r for r in runs if r["workload"] == workload and r.get("size") == size
                    and r[group] == n}
        mine = by_seed(name)
        vals = [r["metric"] for r in mine.values() if r["metric"] is not None]
        mean, std = mean_std(vals) if vals else (None, None)
        first = next(iter(mine.values()))
        row = {"workload": workload, group: name, "seeds": len(mine), "diverged": sum(r["diverged"] for r in
                                                                                       mine.values()),
               "mean": mean, "std": std, "params": first["params"],
               "extra_flops_per_token": first["extra_flops_per_token"]}
        if size is not None:
            row["size"] = size
        if workload == "induction":
            reach = [r["steps_to_90pct"] for r in mine.values()]
            row["runs_reaching_90pct"] = sum(s is not None for s in reach)
            row["steps_to_90pct"] = mean_std(reach)[0] if all(s is not None for s in reach) else None
        lower = workload == "lm"
        for ref, prefix in (("vanilla", "vs_vanilla"), ("kv", "vs_kv")):
            if name != ref and by_seed(ref):
                row.update({f"{prefix}_{k}": v for k, v in paired_by_seed(by_seed(ref), mine, lower).items()})
        out.append(row)
    return out


def _row_fields(summary: list[dict]) -> None:
    """The common row fields of every results.json (model, layers, kv_shift, metric)."""
    for r in summary:
        name = r.get("variant", r.get("arm"))
        r.update(model=name if "size" not in r else f"{name}-{r['size']}",
                 layers=1 if r["workload"] == "induction" else r.get("layers", 2),
                 kv_shift=name != "vanilla", metric="val_loss" if r["workload"] == "lm" else "induction accuracy")


COLUMNS = ["workload", "variant", "seeds", "diverged", "mean", "std", "vs_vanilla_diff", "vs_vanilla_diff_std",
           "vs_vanilla_p_t", "vs_vanilla_p_signflip", "vs_vanilla_better_in", "vs_kv_diff", "vs_kv_p_signflip",
           "runs_reaching_90pct", "steps_to_90pct", "params", "extra_flops_per_token"]


def plot_variants(summary: list[dict], runs: list[dict], path: Path, title: str) -> None:
    """Left: paired LM val-loss difference to vanilla per variant (+- 1 std over seeds); right: the toy
    induction accuracy curve of every variant (mean over seeds)."""
    import numpy as np

    from ..report import get_pyplot, save_figure

    plt = get_pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    lm = [r for r in summary if r["workload"] == "lm" and r["variant"] != "vanilla" and "vs_vanilla_diff" in r]
    if lm:
        ys = np.arange(len(lm))
        ax0.barh(ys, [r["vs_vanilla_diff"] for r in lm], xerr=[r["vs_vanilla_diff_std"] for r in lm],
                 color=["C1" if r["variant"] == "kv" else "C0" for r in lm], capsize=3)
        ax0.set_yticks(ys, [f"{r['variant']} (sign-flip p {r.get('vs_vanilla_p_signflip') or float('nan'):.2g})"
                            for r in lm])
        ax0.axvline(0, color="0.3", linewidth=1)
        ax0.invert_yaxis()
        n = max(r["seeds"] for r in lm)
        ax0.set_xlabel("val loss minus vanilla's, same seed (nats/token; < 0: better)")
        ax0.set_title(f"language model: paired difference, mean +- 1 std over {n} seeds")
        ax0.grid(alpha=0.3, axis="x")
    variants = list(dict.fromkeys(r["variant"] for r in runs if r["workload"] == "induction"))
    seeds = set()
    for i, v in enumerate(variants):
        rs = [r for r in runs if r["workload"] == "induction" and r["variant"] == v and r["metric"] is not None]
        if not rs:
            continue
        steps = [s for s, _ in rs[0]["curve"]]
        vals = np.array([[x for _, x in r["curve"]] for r in rs])
        seeds.add(len(rs))
        style = {"linestyle": "--" if v == "vanilla" else "-", "color": f"C{i % 10}",
                 "linewidth": 2.2 if v == "kv" else 1.3}
        ax1.plot(steps, vals.mean(0), label=v, **style)
    ax1.axhline(0.9, color="0.3", linestyle=":", linewidth=1)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("induction accuracy")
    ax1.set_title(f"1-layer toy induction: mean over {'/'.join(map(str, sorted(seeds)))} seeds")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _train_tokens(data: str | None) -> int | None:
    """Training tokens of the LM workload's prepared corpus (None when unknown)."""
    import json

    meta = Path(data or "data/stdlib") / "meta.json"
    try:
        return int(json.loads(meta.read_text())["splits"]["train"]["tokens"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _write(name: str, out: Path, summary, runs, config, notes, columns, wall) -> dict:
    from ..report import atomic_write_text, markdown_table
    from .common import write_results
    from .compare import _p

    _row_fields(summary)
    notes = notes + [f"total wall time {wall:.0f} s"]
    payload = write_results(out, name, summary, config, extra={"runs": runs, "notes": notes, "seconds": wall},
                            columns=columns)
    shown = [{**r, **{k: _p(r[k]) for k in r if k.endswith(("p_t", "p_signflip"))}} for r in summary]
    atomic_write_text(out / "results.md", f"# {name}\n\n" + markdown_table(shown, columns) + "\n\n"
                      + "\n".join(f"- {n}" for n in notes) + "\n")
    return payload


def run_variant_experiment(name: str, variants: list[str], *, quick: bool, seeds: int, out_dir, steps=None,
                           data=None, claims: list[str] = ()) -> dict:
    """Train every variant on both workloads for ``seeds`` seeds; write results.json / results.md /
    config.json / ``<name>.png`` into ``out_dir``."""
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    for v in variants:
        _variant(v)
    out = Path(out_dir)
    prepare_lm_run(out, data, name)
    task, run, eval_batch = _toy_setup(quick, steps)
    t0 = time.perf_counter()
    runs = []
    with tqdm(total=2 * len(variants) * seeds, desc=name, unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for seed in range(seeds):  # seed-major: an interrupted sweep still has every variant for seed 0
            for v in variants:
                runs.append(_lm_run(v, seed, out, v, quick, steps, data))
                bar.update(1)
                bar.set_postfix(workload="lm", variant=v, seed=seed)
                runs.append(_toy_run(v, seed, task, run, eval_batch))
                bar.update(1)
                bar.set_postfix(workload="induction", variant=v, seed=seed)
    wall = time.perf_counter() - t0
    summary = summarise(runs)
    from ..models.configuration import TOKEN_MIXING_VARIANTS

    config = {"experiment": name, "mode": "quick" if quick else "full", "seeds": seeds, "variants":
              {v: TOKEN_MIXING_VARIANTS[v] for v in variants},
              "lm": "recipe " + ("stdlib-quick (2 layers, d 128, T 128, batch 8), 60 steps, warm-up 10, val sample "
                                 "16k tokens" if quick else "stdlib-small") + (f", {steps} steps" if steps else ""),
              "induction": f"InductionTask(vocab 128, T 64, pool 32), 1-layer d 64 2-head models, {run.steps} steps, "
                           "lr 3e-3, warm-up 10%, eval on 1,000 held-out sequences"}
    notes = [f"{seeds} seeds per variant; one seed = the same shared initial weights and data order for every "
             "variant",
             "lm metric: final val loss (nats/token, lower is better); induction metric: accuracy at induction "
             "positions (higher is better)",
             "vs_vanilla_* / vs_kv_*: this variant minus vanilla / minus the paper's KV shift, seed by seed; "
             "p_t: paired t-test, p_signflip: exact sign-flip test (never below 2/2^n: 0.25 for 3 seeds)",
             "better_in: seeds where this variant beat vanilla; extra_flops_per_token: FLOPs the mixers add to "
             "the forward pass", *claims]
    payload = _write(name, out, summary, runs, config, notes, COLUMNS, wall)
    plot_variants(summary, runs, out / f"{name}.png", f"{name}: token-mixing variants, paired by seed")
    return payload


def run_ablations(quick: bool = True, seeds: int = 3, out_dir: str | Path = "results/ablations",
                  steps: int | None = None, data: str | None = None) -> dict:
    """The paper's §4.8 ablations: K only, V only, both; free / gate / clamp; window 2 vs 3; KV vs QKV."""
    claims = ["paper claims (§4.8, 1.5B-class models): shifting K and V beats shifting either alone; the free, "
              "gated and clamped forms are close; a window of 3 gives no further gain; adding Q (App. J) gives "
              "no gain"]
    return run_variant_experiment("ablations", ABLATIONS, quick=quick, seeds=seeds, out_dir=out_dir, steps=steps,
                                  data=data, claims=claims)


def run_relatives(quick: bool = True, seeds: int = 3, out_dir: str | Path = "results/relatives",
                  steps: int | None = None, data: str | None = None) -> dict:
    """KV shifting against its relatives: wider / per-channel short convolutions, Canon-B-like, Primer-like,
    the embedding smear."""
    claims = ["no paper claim: the paper compares with vanilla attention only; this table answers the "
              "reviewer's question (KV shifting vs a causal 1-D convolution)"]
    return run_variant_experiment("relatives", RELATIVES, quick=quick, seeds=seeds, out_dir=out_dir, steps=steps,
                                  data=data, claims=claims)


# scaling: (name, hidden, layers, heads) per workload; steps follow from a fixed number of training tokens per
# non-embedding parameter (Kaplan et al.'s count), the same ratio for every size of a workload
SCALING_SIZES = {
    "quick": {"lm": [("d64", 64, 2, 2), ("d96", 96, 2, 2), ("d128", 128, 2, 2)],
              "induction": [("d32", 32, 1, 2), ("d64", 64, 1, 2), ("d96", 96, 1, 2)]},
    "full": {"lm": [("d128", 128, 4, 2), ("d256", 256, 4, 4), ("d384", 384, 6, 6), ("d512", 512, 8, 8)],
             "induction": [("d32", 32, 1, 2), ("d64", 64, 1, 2), ("d128", 128, 1, 2), ("d256", 256, 1, 4)]},
}
TOKENS_PER_PARAM = {"quick": {"lm": 0.3, "induction": 12.5}, "full": {"lm": 20.0, "induction": 50.0}}


def non_embedding_params(hidden: int, layers: int, intermediate: int) -> int:
    """Attention and MLP matrices and norms of the decoder stack (no embeddings, no LM head, no shift)."""
    return layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def scaling_plan(quick: bool) -> dict[str, list[dict]]:
    """Per workload: one entry per size with its dimensions, non-embedding parameters and steps."""
    mode = "quick" if quick else "full"
    plan = {}
    for workload, sizes in SCALING_SIZES[mode].items():
        tokens_per_step = 8 * 128 if (workload == "lm" and quick) else (32 * 128 if workload == "lm" else 32 * 64)
        rows = []
        for name, d, L, h in sizes:
            ff = int(round(2.75 * d / 8)) * 8 if workload == "lm" else 4 * d
            n = non_embedding_params(d, L, ff)
            steps = max(20, math.ceil(TOKENS_PER_PARAM[mode][workload] * n / tokens_per_step))
            rows.append({"size": name, "hidden_size": d, "layers": L, "heads": h, "intermediate_size": ff,
                         "non_embedding_params": n, "steps": steps, "tokens": steps * tokens_per_step})
        plan[workload] = rows
    return plan


def plot_scaling(summary: list[dict], path: Path) -> None:
    """The paired KV - vanilla gap against non-embedding parameters, one panel per workload."""
    from ..report import get_pyplot, save_figure

    plt = get_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (workload, label) in zip(axes, (("lm", "KV - vanilla val loss (nats/token; < 0: KV better)"),
                                            ("induction", "KV - vanilla induction accuracy (> 0: KV better)"))):
        rows = [r for r in summary if r["workload"] == workload and r["arm"] == "kv" and "vs_vanilla_diff" in r]
        if not rows:
            continue
        xs = [r["non_embedding_params"] for r in rows]
        ax.errorbar(xs, [r["vs_vanilla_diff"] for r in rows], yerr=[r["vs_vanilla_diff_std"] for r in rows],
                    marker="o", capsize=3, color="C1")
        for r, x in zip(rows, xs):
            ax.annotate(f"{r['size']} ({r['steps']} steps)", (x, r["vs_vanilla_diff"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.axhline(0, color="0.3", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters (same tokens per parameter at every size)")
        ax.set_ylabel(label)
        ax.set_title(f"{workload}: paired gap, mean +- 1 std over {max(r['seeds'] for r in rows)} seeds")
        ax.grid(alpha=0.3)
    fig.suptitle("scaling (paper Fig. 7a: the KV-vanilla loss gap does not shrink with size)")
    fig.tight_layout()
    save_figure(fig, path)


SCALING_COLUMNS = ["workload", "size", "arm", "seeds", "diverged", "mean", "std", "vs_vanilla_diff",
                   "vs_vanilla_diff_std", "vs_vanilla_p_t", "vs_vanilla_p_signflip", "vs_vanilla_better_in",
                   "non_embedding_params", "params", "steps", "tokens", "epochs"]


def run_scaling(quick: bool = True, seeds: int = 3, out_dir: str | Path = "results/scaling",
                steps: int | None = None, data: str | None = None) -> dict:
    """Vanilla vs KV shifting at three (``--full``: four) sizes trained on the same number of tokens per
    non-embedding parameter, on both workloads; the paired gap per size."""
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    prepare_lm_run(out, data, "scaling")
    plan = scaling_plan(quick)
    if steps is not None:  # smoke tests: every size gets `steps` steps (no longer a fixed ratio)
        plan = {w: [{**p, "steps": steps, "tokens": steps * p["tokens"] // p["steps"]} for p in ps]
                for w, ps in plan.items()}
    corpus = _train_tokens(data)
    for p in plan["lm"]:  # honest about repeats: a size that needs more tokens than the corpus has
        p["epochs"] = float(f"{p['tokens'] / corpus:.3g}") if corpus else None
        if corpus and p["tokens"] > corpus:
            print(f"scaling: {p['size']} trains on {p['tokens']:,} tokens, {p['epochs']}x the corpus "
                  f"({corpus:,} tokens); pass a bigger `kvshift data prepare` folder with --data", file=sys.stderr)
    task, _, eval_batch = _toy_setup(quick, None)
    t0 = time.perf_counter()
    runs = []
    total = sum(len(p) for p in plan.values()) * 2 * seeds
    with tqdm(total=total, desc="scaling", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for seed in range(seeds):
            for arm in ("vanilla", "kv"):
                for p in plan["lm"]:
                    size = {"model.hidden_size": p["hidden_size"], "model.num_hidden_layers": p["layers"],
                            "model.num_attention_heads": p["heads"], "model.num_key_value_heads": p["heads"],
                            "model.intermediate_size": p["intermediate_size"], "steps": p["steps"],
                            "eval_every": p["steps"], "optim.warmup_steps": max(1, p["steps"] // 6),
                            "data.batch_size": 8 if quick else 32}
                    r = _lm_run(arm, seed, out, f"{arm}-{p['size']}", quick, None, data, size)
                    runs.append({**r, "arm": arm, "size": p["size"], "steps": p["steps"], "tokens": p["tokens"],
                                 "non_embedding_params": p["non_embedding_params"]})
                    bar.update(1)
                    bar.set_postfix(workload="lm", arm=arm, size=p["size"], seed=seed)
                for p in plan["induction"]:
                    from .toy_train import RunSpec

                    run = RunSpec(steps=p["steps"], batch_size=32, warmup_steps=max(1, p["steps"] // 10),
                                  eval_every=max(1, p["steps"] // 20), lr=3e-3)
                    r = _toy_run(arm, seed, task, run, eval_batch, layers=p["layers"], hidden=p["hidden_size"],
                                 heads=p["heads"])
                    runs.append({**r, "arm": arm, "size": p["size"], "steps": p["steps"], "tokens": p["tokens"],
                                 "non_embedding_params": p["non_embedding_params"]})
                    bar.update(1)
                    bar.set_postfix(workload="induction", arm=arm, size=p["size"], seed=seed)
    wall = time.perf_counter() - t0
    summary = summarise(runs, group="arm")
    for r in summary:
        p = next(x for x in plan[r["workload"]] if x["size"] == r["size"])
        r.update(non_embedding_params=p["non_embedding_params"], steps=p["steps"], tokens=p["tokens"],
                 layers=p["layers"], epochs=p.get("epochs"))
        r.pop("vs_kv_diff", None)
    mode = "quick" if quick else "full"
    config = {"experiment": "scaling", "mode": mode, "seeds": seeds, "plan": plan,
              "tokens_per_non_embedding_param": TOKENS_PER_PARAM[mode],
              "lm": "recipe " + ("stdlib-quick" if quick else "stdlib-small") + " with the sizes of the plan",
              "induction": "InductionTask(vocab 128, T 64, pool 32), 1-layer models of the plan, lr 3e-3"}
    notes = [f"{seeds} seeds per (arm, size); a seed = the same shared initial weights and data order in both arms",
             f"training tokens per non-embedding parameter: lm {TOKENS_PER_PARAM[mode]['lm']}, induction "
             f"{TOKENS_PER_PARAM[mode]['induction']} (the same at every size of a workload)",
             "vs_vanilla_diff: KV - vanilla seed by seed (lm: val loss, lower is better; induction: accuracy)",
             "paper claim (Fig. 7a, 1.5B to 19B): the loss gap between KV shifting and vanilla does not shrink "
             "as the model grows"]
    payload = _write("scaling", out, summary, runs, config, notes, SCALING_COLUMNS, wall)
    plot_scaling(summary, out / "scaling.png")
    return payload
