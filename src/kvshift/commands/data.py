"""Command line of ``kvshift data prepare``: argument definitions and the runner wired into the main CLI."""

from __future__ import annotations

import argparse
import sys
import time

from ..data.shards import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, prepare, read_meta

EXIT_BAD_INPUT = 2


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data prepare`` options to ``parser``."""
    parser.add_argument(
        "--source",
        required=True,
        help="'stdlib' (the running Python's standard library .py files), a local .txt/.jsonl/.parquet "
        "file, directory or glob, or a Hugging Face dataset name (prefix hf: or file: to force)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory for the shards (default data/stdlib for --source stdlib, which is where "
        "`kvshift train` and `kvshift compare` look by default)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="existing tokenizer.json, AutoTokenizer directory, hub name or .gguf model file, e.g. the model you "
             "will train with --init-from (default: train a byte-level BPE)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary size of the trained BPE (default: %(default)s)"
    )
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF rows (default: %(default)s)")
    parser.add_argument(
        "--split-val",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        dest="split_val",
        help=f"fraction of documents held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--max-docs", type=int, default=None, help="read at most this many documents (default: all)")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop reading after this many text bytes (default: no limit)")
    parser.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset (default: %(default)s)")
    parser.add_argument("--hf-config", default=None, help="configuration name of a Hugging Face dataset (default: none)")
    parser.add_argument("--streaming", action="store_true", help="stream the Hugging Face dataset (default: off, download it)")
    parser.add_argument("--eos-token", default=None, help="document separator token of an existing tokenizer (default: its EOS token)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="read only local files whose relative path or name matches (repeatable; default: all)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip local files whose relative path or name matches (repeatable; default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a differently prepared --out (default: off)")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars (default: bars when stderr is a terminal)")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``data prepare``; bad input is reported on stderr with exit code 2."""
    started = time.perf_counter()
    if args.out is None:
        if args.source != "stdlib":
            print("kvshift data prepare: error: --out is required unless --source stdlib", file=sys.stderr)
            return EXIT_BAD_INPUT
        args.out = "data/stdlib"
    try:
        out = prepare(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            text_field=args.text_field,
            val_fraction=args.split_val,
            max_docs=args.max_docs,
            max_bytes=args.max_bytes,
            hf_split=args.hf_split,
            hf_config=args.hf_config,
            streaming=args.streaming,
            eos_token=args.eos_token,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            include=args.include,
            exclude=args.exclude,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"kvshift data prepare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    meta = read_meta(out)
    elapsed = time.perf_counter() - started
    print(
        f"prepared {out} in {elapsed:.1f}s: vocab {meta['vocab_size']} ({meta['dtype']}), eos id {meta['eos_id']}"
    )
    for split, info in meta["splits"].items():
        print(f"  {split}: {info['docs']} docs, {info['tokens']} tokens, {info['text_bytes']} text bytes")
    info = meta.get("source_info", {})
    if info.get("skipped_binary") or info.get("skipped_non_utf8"):
        print(f"  skipped {info.get('skipped_binary', 0)} binary and {info.get('skipped_non_utf8', 0)} non-UTF-8 files")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data`` subcommands (``prepare``) to the ``kvshift data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prepare_parser = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    add_prepare_arguments(prepare_parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``kvshift data <subcommand>``."""
    if args.data_command == "prepare":
        return run_prepare(args)
    raise ValueError(f"unknown data subcommand {args.data_command!r}")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m kvshift.data.cli --source ... --out ...``)."""
    parser = argparse.ArgumentParser(
        prog="kvshift data prepare", description="Tokenize a corpus into shards."
    )
    add_prepare_arguments(parser)
    return run_prepare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
