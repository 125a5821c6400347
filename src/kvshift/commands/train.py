"""`kvshift train --recipe NAME [--set a.b=value ...] [--out DIR] [--resume DIR]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..train.config import apply_overrides, config_from_dict
from ..train.recipes import RECIPES, get_recipe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, help=f"one of {sorted(RECIPES)} (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<recipe>)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run in DIR from its latest checkpoint (its saved config is used; "
                             "--set still applies)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve_config(args: argparse.Namespace):
    if args.resume is not None:
        from ..train.checkpoint import load_checkpoint

        _, _, state, _ = load_checkpoint(args.resume)
        cfg = config_from_dict(state["config"])
        if args.recipe is not None and args.recipe != cfg.name:
            print(f"note: --resume uses the saved config of recipe {cfg.name!r}, not {args.recipe!r}",
                  file=sys.stderr)
    else:
        cfg = get_recipe(args.recipe or "tiny")
    return apply_overrides(cfg, args.overrides)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        from ..train.config import config_to_dict

        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from ..train.loop import train

    out = Path(args.resume) if args.resume is not None and args.out is None else Path(args.out or f"runs/{cfg.name}")
    summary = train(cfg, out, resume=args.resume)
    summary = {k: v for k, v in summary.items() if k != "losses"}
    print(json.dumps(summary, indent=2))
    return 0
