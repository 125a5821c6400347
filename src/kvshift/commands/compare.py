"""`kvshift compare`: the multi-seed paired comparison of vanilla and KV-shifting attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.compare import compare

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.recipes import RECIPES

    parser.add_argument("--recipe", default=None,
                        help=f"one of {sorted(RECIPES)} (default: stdlib-small, or stdlib-quick with --quick)")
    parser.add_argument("--seeds", type=int, default=6,
                        help="seeds per arm; one seed = one shared initialisation and data order (default: 6)")
    parser.add_argument("--inits", default=None,
                        help="comma-separated kv_shift_init values, one KV-shifting arm each "
                             "(default: paper,identity; paper with --quick)")
    parser.add_argument("--data", default=None, help="prepared data folder (default: the recipe's, data/stdlib)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: results/compare, results/compare-quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="the <= 6 minute CPU version (recipe stdlib-quick, paper init only; default: off)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the recipe for every arm (repeatable; default: none)")


def run(args: argparse.Namespace) -> int:
    recipe = args.recipe or ("stdlib-quick" if args.quick else "stdlib-small")
    out = args.out or ("results/compare-quick" if args.quick else "results/compare")
    inits = args.inits.split(",") if args.inits else (["paper"] if args.quick else ["paper", "identity"])
    compare(recipe, args.seeds, out, data=args.data, overrides=args.overrides, inits=[i.strip() for i in inits])
    print((Path(out) / "results.md").read_text())
    return 0
