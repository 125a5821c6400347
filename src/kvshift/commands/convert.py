"""`kvshift convert`: a Llama / Qwen2 / Qwen3 / Mistral or Baichuan-M1 checkpoint -> a KVShiftForCausalLM checkpoint."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..models.configuration import KV_SHIFT_INITS
from ..models.convert import SUPPORTED_ARCHITECTURES, convert_checkpoint

__all__ = ["add_arguments", "run"]

_SUPPORTED_NAMES = ", ".join([*SUPPORTED_ARCHITECTURES.values(), "BaichuanM1ForCausalLM"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="PATH_OR_ID",
                        help=f"source checkpoint: a directory, a hub id or a .gguf file ({_SUPPORTED_NAMES}; GGUF "
                             "needs pip install 'kvshift[gguf]')")
    parser.add_argument("--to", dest="out_dir", required=True, metavar="DIR",
                        help="output directory (written atomically; must not exist or be empty)")
    parser.add_argument("--init", choices=KV_SHIFT_INITS, default="identity",
                        help="shift-weight init: identity (= the source model exactly, default), near-identity "
                             "(current 0.9, previous 0.1), paper, softmax (the last three change the model)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the saved weights (default: the source's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of random shift weights (paper/softmax; default: the global RNG)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (default: off)")


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model = convert_checkpoint(args.source, args.out_dir, init=args.init, dtype=args.dtype, seed=args.seed,
                                   overwrite=args.overwrite)
    for w in caught:  # one line each, not Python's file:line form
        if issubclass(w.category, UserWarning) and "kv_shift_init" in str(w.message):
            print(f"warning: {w.message}", file=sys.stderr)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    sliding = [i for i, kind in enumerate(c.layer_types) if kind == "sliding_attention"]
    swa = ""
    if sliding:
        heads, kv = c.layer_attention_heads(sliding=True)
        swa = (f" (layers {', '.join(map(str, sliding))} slide over {c.sliding_window} tokens with {heads} heads / "
               f"{kv} KV heads)")
    print(f"converted {args.source} -> {args.out_dir}: {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads{swa}, {n_params:,} parameters, "
          f"kv_shift_init={args.init}, dtype={str(next(model.parameters()).dtype).removeprefix('torch.')}")
    return 0
