"""`kvshift train --recipe NAME [--init-from CKPT] [--data DIR] [--set a.b=value ...] [--out DIR] [--resume DIR]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..train.config import apply_overrides, config_from_dict
from ..train.recipes import RECIPES, get_recipe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help=f"one of {sorted(RECIPES)} (default: tiny; retrofit with --init-from)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="prepared data folder (`kvshift data prepare`); sets data.source=prepared and "
                             "data.path=DIR (default: the recipe's)")
    parser.add_argument("--init-from", default=None, metavar="PATH_OR_ID_OR_GGUF",
                        help="start from a pretrained checkpoint: a kvshift model folder, a Llama / Qwen2 / Qwen3 / "
                             "Mistral folder or hub id, or a .gguf file (converted on the fly; shift init identity). "
                             "Sets model.init_from; the architecture is the checkpoint's (default: from scratch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. --set optim.lr=1e-3 (repeatable; "
                             "default: none)")
    parser.add_argument("--out", default=None,
                        help="run folder, new or empty (default: runs/<recipe>; with --resume, the run's own)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue a run from a run folder (its latest intact checkpoint) or from one "
                             "checkpoints/step_* folder; its saved config is used and --set still applies "
                             "(default: start a new run)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (default: off)")


def _saved_config(path: str):
    """The config saved in the checkpoint ``path`` resolves to (the newest whose trainer state reads)."""
    from ..train.checkpoint import STATE_FILE, latest_checkpoint, older_checkpoints

    folder = latest_checkpoint(path)
    for candidate in [folder, *older_checkpoints(folder)]:
        try:
            return config_from_dict(json.loads((candidate / STATE_FILE).read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise ValueError(f"no readable {STATE_FILE} in the checkpoints of {path}")


def resolve_config(args: argparse.Namespace):
    if args.resume is not None:
        from ..paths import check_local_path

        check_local_path(args.resume, "--resume", must_exist=True)
        cfg = _saved_config(args.resume)
        if args.recipe is not None and args.recipe != cfg.name:
            print(f"note: --resume uses the saved config of recipe {cfg.name!r}, not {args.recipe!r}",
                  file=sys.stderr)
    else:
        init = getattr(args, "init_from", None) or any(o.partition("=")[0].strip() == "model.init_from"
                                                        for o in args.overrides)
        cfg = get_recipe(args.recipe or ("retrofit" if init else "tiny"))
    overrides = list(args.overrides)
    if getattr(args, "data", None) is not None:
        from ..paths import check_local_path

        check_local_path(args.data, "--data", must_exist=True)
        overrides = ["data.source=prepared", f"data.path={args.data}", *overrides]
    init_from = getattr(args, "init_from", None)
    for item in overrides:  # --set model.init_from=X is --init-from X
        key, _, value = item.partition("=")
        if key.strip() == "model.init_from":
            init_from = value.strip()
    ckpt_config = None
    if args.resume is None and (init_from or cfg.model.init_from):
        from ..train.retrofit import checkpoint_config, init_from_checkpoint

        ckpt_config = checkpoint_config(init_from or cfg.model.init_from)
        init_from_checkpoint(cfg, init_from, config=ckpt_config)
        overrides = [o for o in overrides if o.partition("=")[0].strip() != "model.init_from"]
    cfg = apply_overrides(cfg, overrides)
    if ckpt_config is not None:
        from ..train.retrofit import check_model_fields

        check_model_fields(cfg.model, ckpt_config)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        from ..train.config import config_to_dict

        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from ..train.checkpoint import run_dir_of
    from ..train.loop import TrainingDiverged, TrainingInterrupted, train

    if args.out is not None:
        out = Path(args.out)
    elif args.resume is not None:
        out = run_dir_of(args.resume)
    else:
        out = Path(f"runs/{cfg.name}")
    is_main = os.environ.get("RANK", "0") == "0"  # torchrun: only rank 0 prints
    try:
        summary = train(cfg, out, resume=args.resume)
    except TrainingDiverged as err:
        if is_main:
            print(f"kvshift train: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        if is_main:
            print(f"kvshift train: {err}", file=sys.stderr)
        return 130
    if is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return 0
