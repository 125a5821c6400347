"""`kvshift reproduce retrofit`: does a KV shift added to a *pretrained* vanilla model learn anything?

Per seed: pretrain the stdlib-small vanilla model, then continue it in every arm below from that one
checkpoint, on one data order (the continuation's own, not a replay of pretraining), and train a KV model
from scratch for as many steps in all as the reference. Reported against the vanilla continuation (the
control), paired by seed: final val loss on the whole val split (t-test, exact sign-flip p), the copying
probes, val curves, and how far every shift weight moved from its start.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RETROFIT_ARMS", "RetrofitArm", "run_retrofit", "shift_movement", "plot_retrofit"]

CONTROL = "vanilla"
SCRATCH = "kv-scratch"
# the continuation's data order: seed + this, the same in every arm, unlike pretraining's
CONTINUE_SEED_OFFSET = 1000


@dataclass(frozen=True)
class RetrofitArm:
    name: str
    kv_shift: bool = True
    kv_shift_init: str = "auto"  # auto = identity for a vanilla checkpoint
    shift_lr_mult: float = 1.0
    trainable: str = "all"
    overrides: dict = field(default_factory=dict)


RETROFIT_ARMS = (
    RetrofitArm(CONTROL, kv_shift=False),
    RetrofitArm("kv-identity"),
    RetrofitArm("kv-identity-lr10", shift_lr_mult=10.0),
    RetrofitArm("kv-identity-lr100", shift_lr_mult=100.0),
    RetrofitArm("kv-shift-only", trainable="shift"),
    RetrofitArm("kv-near-identity", kv_shift_init="near-identity"),
)


def _settings(quick: bool, steps: int | None) -> dict:
    """Pretraining / continuation steps and the recipe; ``quick`` is the <= 8-minute smoke version."""
    if quick:
        s = steps or 100
        return {"recipe": "stdlib-quick", "pretrain": s, "continue": s, "seeds": 2, "continue_lr": 1e-3}
    s = steps or 400
    return {"recipe": "stdlib-small", "pretrain": s, "continue": s, "seeds": 6, "continue_lr": 1e-3}


def shift_movement(model, start: dict[int, tuple]) -> list[dict]:
    """Per layer and KV head: the shift weights now, where they started, and the largest absolute move."""
    rows = []
    for layer, (kw, vw) in model.kv_shift_weights().items():
        k0, v0 = start[layer]
        for h in range(kw.shape[0]):
            now = [float(kw[h, 0]), float(kw[h, 1]), float(vw[h, 0]), float(vw[h, 1])]
            was = [float(k0[h, 0]), float(k0[h, 1]), float(v0[h, 0]), float(v0[h, 1])]
            rows.append({"layer": layer, "head": h, "alpha1": now[0], "alpha2": now[1], "beta1": now[2],
                         "beta2": now[3], "start": was, "max_move": max(abs(a - b) for a, b in zip(now, was))})
    return rows


def _entry(summary: dict, run_dir: Path, cfg, val_ds, seed: int) -> dict:
    from ..models import KVShiftForCausalLM
    from .compare import _probe, _val_curve

    model = KVShiftForCausalLM.from_pretrained(summary["final_dir"]).eval()
    entry = {"seed": seed, "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
             "val_tokens": summary["val_tokens"], "seconds": summary["seconds"], "curve": _val_curve(run_dir),
             **_probe(model, cfg, val_ds)}
    return entry, model


def _recipe(st: dict, data: str | None, seed: int, steps: int):
    from ..train.recipes import get_recipe

    cfg = get_recipe(st["recipe"])
    if data is not None:
        cfg.data.path = data
    cfg.seed, cfg.steps, cfg.progress, cfg.tensorboard = seed, steps, False, False
    cfg.ckpt_every = 0  # one checkpoint, at the end
    cfg.eval_every = max(1, steps // 8)
    cfg.log_every = 1  # every step's loss: the arms' first steps are comparable (identity start = control)
    return cfg


def _run_seed(seed: int, st: dict, out: Path, data: str | None, threads: int, queue=None) -> dict:
    """Every run of one seed: pretraining, the continuation arms, the from-scratch reference."""
    import torch

    from ..layers.attention import init_shift_weight
    from ..train.loop import load_datasets, train
    from ..train.retrofit import init_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    done = queue.put if queue is not None else (lambda msg: None)
    cfg = _recipe(st, data, seed, st["pretrain"])
    _, val_ds = load_datasets(cfg)
    result: dict = {"runs": {}, "movement": {}}
    cfg.name, cfg.model.kv_shift = "pretrain-vanilla", False
    run_dir = out / "runs" / f"pretrain-seed{seed}"
    summary = train(cfg, run_dir)
    result["runs"]["pretrained"], _ = _entry(summary, run_dir, cfg, val_ds, seed)
    done(("pretrained", seed, summary["val_loss"], cfg.steps))
    pretrained = summary["final_dir"]
    for arm in RETROFIT_ARMS:
        cfg = _recipe(st, data, seed + CONTINUE_SEED_OFFSET, st["continue"])
        init_from_checkpoint(cfg, pretrained)
        cfg.name = f"retrofit-{arm.name}"
        cfg.model.kv_shift, cfg.model.kv_shift_init = arm.kv_shift, arm.kv_shift_init
        cfg.optim.lr, cfg.optim.shift_lr_mult = st["continue_lr"], arm.shift_lr_mult
        cfg.optim.trainable = arm.trainable
        cfg.validate()
        run_dir = out / "runs" / f"{arm.name}-seed{seed}"
        summary = train(cfg, run_dir)
        entry, model = _entry(summary, run_dir, cfg, val_ds, seed)
        result["runs"][arm.name] = entry
        if arm.kv_shift:
            init = "identity" if arm.kv_shift_init == "auto" else arm.kv_shift_init
            w0 = init_shift_weight(model.config.num_key_value_heads, init)
            result["movement"][arm.name] = shift_movement(model, {i: (w0, w0) for i in model.kv_shift_weights()})
        done((arm.name, seed, summary["val_loss"], cfg.steps))
    cfg = _recipe(st, data, seed, st["pretrain"] * 2)
    cfg.name = SCRATCH
    run_dir = out / "runs" / f"{SCRATCH}-seed{seed}"
    summary = train(cfg, run_dir)
    result["runs"][SCRATCH], _ = _entry(summary, run_dir, cfg, val_ds, seed)
    done((SCRATCH, seed, summary["val_loss"], cfg.steps))
    return result


def run_retrofit(quick: bool = False, out_dir: str | Path = "results/retrofit", seeds: int | None = None,
                 steps: int | None = None, data: str | None = None, workers: int | None = None) -> dict:
    """Run every arm for every seed; write ``results.{json,md}``, ``config.json`` and ``retrofit.png``.

    Seeds run in ``workers`` processes of ``2 // workers`` threads or more (default: 2 processes of one thread
    on a machine of 2+ cores, which trains these small models faster than one process of two threads)."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from ..train.config import config_to_dict
    from ..train.loop import load_datasets
    from .common import prepare_lm_run

    out = Path(out_dir)
    prepare_lm_run(out, data, "retrofit")
    st = _settings(quick, steps)
    n_seeds = seeds or st["seeds"]
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    base = _recipe(st, data, 0, st["pretrain"])
    load_datasets(base)  # a missing or unprepared data folder fails here, before any run
    arms = list(RETROFIT_ARMS)
    cores = os.cpu_count() or 1
    workers = workers or max(1, min(2, cores, n_seeds))
    threads = max(1, cores // workers)
    total = n_seeds * (st["pretrain"] * 3 + st["continue"] * len(arms))
    runs: dict[str, dict[int, dict]] = {a.name: {} for a in arms} | {SCRATCH: {}, "pretrained": {}}
    movement: dict[str, dict[int, list]] = {a.name: {} for a in arms if a.kv_shift}
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with tqdm(total=total, desc=f"retrofit ({workers} processes)", unit="step", file=sys.stderr,
              dynamic_ncols=True) as bar, ctx.Manager() as manager, \
            ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = {pool.submit(_run_seed, s, st, out, data, threads, queue): s for s in range(n_seeds)}
        pending = set(futures)
        while pending:
            while not queue.empty():
                name, seed, loss, n = queue.get()
                bar.update(n)
                bar.set_postfix(run=f"{name}-seed{seed}", val_loss=f"{loss:.4f}")
            finished = {f for f in pending if f.done()}
            for f in finished:
                result = f.result()  # a failed seed raises here
                seed = futures[f]
                for name, entry in result["runs"].items():
                    runs[name][seed] = entry
                for name, rows in result["movement"].items():
                    movement[name][seed] = rows
            pending -= finished
            time.sleep(0.5)
    runs = {name: dict(sorted(per.items())) for name, per in runs.items()}
    wall = time.perf_counter() - t0
    config = {"quick": quick, **st, "seeds": n_seeds, "workers": workers, "threads_per_worker": threads,
              "continue_seed_offset": CONTINUE_SEED_OFFSET, "arms": [a.__dict__ for a in arms], "data": data,
              "base_config": config_to_dict(base)}
    return write_report(out, runs, movement, config, wall)


def scratch_reference(runs: dict, compare_dir: str | Path = "results/compare") -> dict | None:
    """The from-scratch gain at the pretraining length, paired by seed: `kvshift compare`'s KV (paper init)
    minus vanilla val loss for the seeds whose vanilla run *is* this experiment's pretraining run (same
    recipe and seed: equal val loss to 1e-6, checked). None when no such comparison was saved."""
    import json

    path = Path(compare_dir) / "results.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())["runs"]
    if "vanilla" not in saved or "kvshift" not in saved:
        return None
    van = {r["seed"]: r["val_loss"] for r in saved["vanilla"]}
    kv = {r["seed"]: r["val_loss"] for r in saved["kvshift"]}
    seeds = [s for s, r in runs["pretrained"].items() if s in van and s in kv and abs(van[s] - r["val_loss"]) <= 1e-6]
    if not seeds:
        return None
    from .compare import paired_by_seed

    ref = paired_by_seed({s: {"metric": van[s]} for s in seeds}, {s: {"metric": kv[s]} for s in seeds},
                         lower_is_better=True)
    return {**ref, "seeds": seeds, "source": str(path)}


def write_report(out: Path, runs: dict, movement: dict, config: dict, wall: float) -> dict:
    """``results.{json,md}``, ``config.json`` and ``retrofit.png`` from the runs (also to redraw a saved run)."""
    from ..report import atomic_write_text, mean_std, save_figure
    from .common import write_results
    from .compare import METRICS, _p, paired_by_seed

    st, base = config, config["base_config"]
    runs = {name: {int(s): r for s, r in per.items()} for name, per in runs.items()}
    n_seeds = len(runs["pretrained"])
    movement = {name: {int(s): r for s, r in per.items()} for name, per in movement.items()}

    def metric(name: str, key: str = "val_loss") -> dict:
        return {s: {"metric": r[key]} for s, r in runs[name].items()}

    names = [a["name"] for a in config["arms"]] + [SCRATCH]
    rows = []
    for name in ["pretrained", *names]:
        for key, label in METRICS:
            m, s = mean_std([r[key] for r in runs[name].values()])
            kv = name not in (CONTROL, "pretrained")
            rows.append({"model": name, "layers": base["model"]["num_hidden_layers"], "kv_shift": kv,
                         "metric": label, "mean": m, "std": s, "seeds": len(runs[name])})
    paired = {name: {key: paired_by_seed(metric(CONTROL, key), metric(name, key), lower_is_better=True)
                     for key, _ in METRICS} for name in names if name != CONTROL}
    moved = {name: {"mean_max_move": sum(r["max_move"] for rs in per.values() for r in rs) /
                    max(1, sum(len(rs) for rs in per.values())),
                    "largest_move": max((r["max_move"] for rs in per.values() for r in rs), default=0.0)}
             for name, per in movement.items()}
    reference = scratch_reference(runs)
    best = min((n for n in paired if n != SCRATCH), key=lambda n: paired[n]["val_loss"]["diff"])
    tokens = base["data"]["batch_size"] * base["data"]["seq_len"]
    verdict = _verdict(paired, best, reference)
    notes = [
        f"per seed: {st['recipe']} vanilla pretrained {st['pretrain']} steps ({st['pretrain'] * tokens:,} tokens; "
        f"lr {base['optim']['lr']}), then continued {st['continue']} steps in every arm from that checkpoint (lr "
        f"{st['continue_lr']}, warm-up {base['optim']['warmup_steps']}, cosine; one data order per seed, the same "
        f"in every arm); {SCRATCH}: KV shift (paper init) from scratch for {2 * st['pretrain']} steps (lr "
        f"{base['optim']['lr']}, its own cosine schedule: a different schedule from pretrain + continuation, so "
        f"its difference to the control is not the shift's alone); {n_seeds} seeds",
        "validation: the whole val split" if base["data"]["val_tokens"] == 0 else
        f"validation: a fixed sample of about {base['data']['val_tokens']:,} val tokens from every document",
        *(f"{n} - {CONTROL}: {p['val_loss']['diff']:+.4f} +- {p['val_loss']['diff_std']:.4f} nats (t p "
          f"{_p(p['val_loss']['p_t'])}, sign-flip p {_p(p['val_loss']['p_signflip'])}; lower in "
          f"{p['val_loss']['better_in']} of {p['val_loss']['pairs']})" for n, p in paired.items()),
        *(f"{n}: shift weights moved {m['mean_max_move']:.4f} on average (largest move of a head's four weights), "
          f"at most {m['largest_move']:.4f}" for n, m in moved.items()),
        verdict,
        f"total wall time {wall:.0f} s ({config.get('workers', 1)} processes of {config.get('threads_per_worker', 1)} "
        "thread(s), seeds in parallel)",
    ]
    payload = write_results(out, "retrofit", rows, config,
                            extra={"paired": paired, "scratch_reference": reference, "shift_movement": movement,
                                   "moved": moved, "verdict": verdict, "runs": runs, "wall_seconds": wall,
                                   "notes": notes})
    md = (out / "results.md").read_text()
    md += f"\n## Paired differences against the vanilla continuation ({CONTROL}), same seed\n\n" \
          "| arm | metric | mean diff | std | t-test p | sign-flip p | lower in |\n|---|---|---|---|---|---|---|\n"
    for name, per in paired.items():
        for key, label in METRICS:
            s = per[key]
            md += (f"| {name} | {label} | {s['diff']:+.4f} | {s['diff_std']:.4f} | {_p(s['p_t'])} | "
                   f"{_p(s['p_signflip'])} | {s['better_in']} of {s['pairs']} |\n")
    md += "\n## Per seed (final val loss)\n\n| seed | pretrained | " + " | ".join(names) + " |\n|" + \
        "---|" * (len(names) + 2) + "\n"
    for s in sorted(runs["pretrained"]):
        md += f"| {s} | {runs['pretrained'][s]['val_loss']:.4f} | " + \
            " | ".join(f"{runs[n][s]['val_loss']:.4f}" for n in names) + " |\n"
    md += "\n## Shift weights after the continuation (per layer and KV head; seed 0)\n\n" \
          "| arm | layer | head | alpha1 (k cur) | alpha2 (k prev) | beta1 (v cur) | beta2 (v prev) | largest move |\n" \
          "|---|---|---|---|---|---|---|---|\n"
    for name, per in movement.items():
        for r in per.get(0, []):
            md += (f"| {name} | {r['layer']} | {r['head']} | {r['alpha1']:.4f} | {r['alpha2']:.4f} | "
                   f"{r['beta1']:.4f} | {r['beta2']:.4f} | {r['max_move']:.4f} |\n")
    atomic_write_text(out / "results.md", md)
    save_figure(plot_retrofit(runs, paired, movement, st, reference), out / "retrofit.png")
    return payload


def _verdict(paired: dict, best: str, reference: dict | None) -> str:
    b = paired[best]["val_loss"]
    sig = b["p_signflip"] is not None and b["p_signflip"] <= 0.05 and b["diff"] < 0
    text = (f"best retrofit arm: {best}, {b['diff']:+.4f} nats against the vanilla continuation "
            f"({'significant' if sig else 'not significant'}: sign-flip p {b['p_signflip']:.2g}, lower in "
            f"{b['better_in']} of {b['pairs']})")
    if reference is None:
        return text + "; no from-scratch comparison at the pretraining length was found (run `kvshift compare`)"
    gain = reference["diff"]
    if gain < 0 and b["diff"] <= gain:
        share = "recovers all of"
    elif gain < 0 and b["diff"] < 0:
        share = f"recovers {b['diff'] / gain:.0%} of"
    else:
        share = "does not recover"
    return (text + f"; from scratch, KV shifting is {gain:+.4f} +- {reference['diff_std']:.4f} nats against vanilla "
            f"at {len(reference['seeds'])} of these seeds' pretraining length (`kvshift compare`, the same vanilla "
            f"runs): the retrofitted shift {share} the from-scratch gain")


def plot_retrofit(runs: dict, paired: dict, movement: dict, st: dict, reference: dict | None = None):
    """Left: val curves (continuation arms from the pretraining step on; the from-scratch reference over
    its whole run). Middle: paired final difference to the control per arm. Right: shift-weight moves."""
    import numpy as np

    from ..report import get_pyplot

    plt = get_pyplot()
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, per in runs.items():
        if name == "pretrained" or not per:
            continue
        offset = 0 if name == SCRATCH else st["pretrain"]
        curves = [r["curve"] for r in per.values()]
        steps = np.array([s for s, _ in curves[0]]) + offset
        vals = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
        ax.plot(steps, vals.mean(0), marker="o", ms=2.5, label=name,
                linestyle="--" if name in (CONTROL, SCRATCH) else "-")
    ax.set_xlabel("step (pretraining + continuation)")
    ax.set_ylabel("val loss (nats/token, mean over seeds)")
    ax.set_title("validation loss")
    lo = min(min(v for _, v in r["curve"][len(r["curve"]) // 2:]) for per in runs.values() if per
             for r in per.values() if r.get("curve"))
    ax.set_ylim(lo - 0.1, lo + 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    # the arms that train what the control trains, plus the shift; the shift-only arm (it trains 0.1 % of
    # the weights) and the from-scratch run differ by far more and are named in the title instead
    names = [n for n in paired if n not in (SCRATCH, "kv-shift-only")]
    diffs = [paired[n]["val_loss"]["diff"] for n in names]
    errs = [paired[n]["val_loss"]["diff_std"] for n in names]
    bx.barh(names, diffs, xerr=errs, color="C0")
    far = [f"{n} {paired[n]['val_loss']['diff']:+.3f}" for n in paired if n not in names]
    bx.axvline(0, color="k", lw=0.8)
    if reference is not None:
        bx.axvline(reference["diff"], color="C3", ls="--", lw=1,
                   label=f"from scratch, KV - vanilla at {st['pretrain']} steps ({reference['diff']:+.3f})")
        bx.legend(fontsize=7, loc="lower left")
    bx.set_xlabel(f"final val loss - {CONTROL} (nats; mean ± std over seeds)")
    bx.set_title("paired by seed (left of 0: lower than the control)" + ("\nnot drawn: " + ", ".join(far) if far
                                                                        else ""), fontsize=9)
    bx.grid(alpha=0.3, axis="x")
    for i, name in enumerate(movement):
        moves = [r["max_move"] for rs in movement[name].values() for r in rs]
        cx.scatter(np.full(len(moves), i) + np.linspace(-0.2, 0.2, len(moves)), moves, s=10)
    cx.set_xticks(range(len(movement)), list(movement), rotation=20, fontsize=7)
    cx.set_yscale("log")
    cx.set_ylabel("largest move of a head's shift weights")
    cx.set_title("how far the shift weights moved (every head, seed)")
    cx.grid(alpha=0.3)
    fig.tight_layout()
    return fig
