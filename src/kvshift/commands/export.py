"""`kvshift export mlx`: a kvshift checkpoint -> an mlx-lm model folder (see :mod:`kvshift.export.mlx`)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=("mlx",), help="mlx: an mlx-lm model folder (Apple silicon; MLX CPU on Linux)")
    parser.add_argument("--model", required=True, metavar="DIR", help="a kvshift checkpoint folder")
    parser.add_argument("--to", dest="out_dir", required=True, metavar="DIR",
                        help="output folder (written atomically; must not exist or be empty)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="quantise with mlx-lm's own quantisation (needs mlx-lm; default: fp32 weights)")
    parser.add_argument("--group-size", type=int, default=64, help="quantisation group size (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (default: off)")


def run(args: argparse.Namespace) -> int:
    from ..export import export_mlx

    out = export_mlx(args.model, args.out_dir, bits=args.bits, group_size=args.group_size, overwrite=args.overwrite)
    kind = f"{args.bits}-bit" if args.bits else "fp32"
    print(f"exported {args.model} -> {out} ({kind}); run it with: mlx_lm.generate --model {out} "
          f"--trust-remote-code --prompt 'Hello'")
    return 0
