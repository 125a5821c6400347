"""`kvshift <command>`: reproduce, train, compare, data, generate, eval, bench, convert, export.

Each command lives in its own module of :mod:`kvshift.commands`, which exposes ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so ``kvshift --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS


def _module(command: str) -> str:
    return f"kvshift.commands.{command}"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshift", description="KV shifting attention toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(_module(name)).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(_module(args.command))
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
