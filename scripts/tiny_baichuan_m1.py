"""Write a tiny random checkpoint in Baichuan-M1's layout, to try ``kvshift convert`` on without downloading
the 14B model:

    python scripts/tiny_baichuan_m1.py --to tiny-m1
    kvshift convert --from tiny-m1 --to tiny-m1-kv

4 layers of width 64 (4 heads / 2 KV heads); layers 1 and 3 are sliding-window layers with their own head counts
(2 heads of size 32 / 1 KV head); kvshift's byte-level tokenizer. The weights are random: the model computes
nothing meaningful, but every piece of the layout (W_pack, conv_k / conv_v, NormHead, sliding_window_layers) is
there."""

from __future__ import annotations

import argparse
import sys

from kvshift.data.tokenizer import byte_tokenizer
from kvshift.models.baichuan_m1 import make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--sliding-window", type=int, default=8,
                        help="tokens a sliding-window layer sees, itself included (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (default: off)")
    args = parser.parse_args(argv)
    if args.sliding_window <= 0:
        parser.error(f"--sliding-window must be positive, got {args.sliding_window}")
    try:
        out = make_tiny_checkpoint(args.to, seed=args.seed, sliding_window=args.sliding_window,
                                   tokenizer=byte_tokenizer(), overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random Baichuan-M1 checkpoint to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
