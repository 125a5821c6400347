"""`kvshift <command>`: reproduce, train, compare, data, generate, eval, bench, convert.

Each command lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``kvshift --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "reproduce": ("kvshift.experiments.cli", "run a paper experiment (induction, ngram, hopk, theorems)"),
    "train": ("kvshift.train.cli", "train a language model from a recipe"),
    "compare": ("kvshift.experiments.compare", "multi-seed vanilla vs KV-shifting comparison"),
    "data": ("kvshift.data.cli", "prepare token shards from a corpus"),
    "generate": ("kvshift.generate_cli", "generate text with a saved model"),
    "eval": ("kvshift.eval.cli", "evaluate a saved model with lm-evaluation-harness"),
    "bench": ("kvshift.bench.cli", "benchmarks: ratios against vanilla attention"),
    "convert": ("kvshift.models.convert", "convert a Llama / Qwen2 / Qwen3 / Mistral checkpoint"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshift", description="KV shifting attention toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kvshift {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
