"""Perplexity of mlx-lm model folders on held-out text: the standard library modules the `tiny` recipe holds
out for validation (sorted stdlib *.py files 20-25; it trains on files 0-19).

    .venv-mlx/bin/python scripts/mlx_perplexity.py --model runs/tiny/mlx --model runs/tiny/mlx-4bit

Prints one line per folder: tokens scored, mean loss (nats per token) and perplexity, each chunk of
``--chunk`` tokens scored from its own start (no context carried across chunks)."""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path


def held_out_text() -> str:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())[20:26]
    return "\n".join(p.read_text(errors="replace") for p in files)


def perplexity(model_dir: str, tokens: int, chunk: int) -> tuple[int, float]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model, tokenizer = load(model_dir, trust_remote_code=True)
    ids = tokenizer.encode(held_out_text(), add_special_tokens=False)[:tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:start + chunk + 1]
        if len(piece) < 2:
            break
        logits = model(mx.array([piece[:-1]]))[0].astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, mx.array(piece[1:]), reduction="sum")
        total += float(loss)
        count += len(piece) - 1
    return count, total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="an mlx-lm folder (repeatable)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of held-out text (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per forward (default: %(default)s)")
    args = parser.parse_args()
    for model_dir in args.model:
        n, loss = perplexity(model_dir, args.tokens, args.chunk)
        print(f"{model_dir}: {n} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}")


if __name__ == "__main__":
    main()
