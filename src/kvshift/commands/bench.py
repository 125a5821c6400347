"""`kvshift bench op|layer|model|decode|all|gpu|kernels`: ratios against vanilla attention in one run, tables +
JSON; `kernels` compiles every Triton kernel specialisation for NVIDIA targets ahead of time (no GPU needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..report import environment, markdown_table

__all__ = ["add_arguments", "run", "run_benchmarks"]

WHAT = ("op", "layer", "model", "decode", "all", "gpu", "kernels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=WHAT,
                        help="which benchmark ('gpu': every benchmark at GPU shapes; 'kernels': compile every Triton "
                             "kernel specialisation for sm_80 / sm_90 ahead of time, no GPU needed)")
    parser.add_argument("--arch", type=int, action="append", default=None, metavar="SM",
                        help="kernels: target compute capability, e.g. 90 (repeatable; default: 80 and 90)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: each benchmark's own)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md / .json results (default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no files (default: off)")


def _table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "bench"]
    return markdown_table(rows, cols, digits=3).rstrip("\n")


def run_benchmarks(what: str, device: torch.device, rounds: int | None = None) -> dict[str, list[dict]]:
    from ..bench.model import CPU_MODEL, GPU_MODEL, bench_decode, bench_layer, bench_train_step
    from ..bench.op import bench_op

    cuda = device.type == "cuda"
    spec = GPU_MODEL if cuda else CPU_MODEL
    dtype = torch.bfloat16 if cuda else torch.float32
    r = rounds or (30 if cuda else 15)
    out: dict[str, list[dict]] = {}
    if what in ("op", "all"):
        out["op"] = bench_op(device=device)
    if what in ("layer", "all"):
        out["layer"] = [bench_layer(spec, device, dtype, rounds=r)]
    if what in ("model", "all"):
        out["model"] = [bench_train_step(spec, device, dtype if cuda else None, rounds=r, compile=cuda)]
    if what in ("decode", "all"):
        # eager (DynamicCache) and compiled (StaticCache + torch.compile fullgraph) decoding
        out["decode"] = [row for compile in (False, True)
                         for row in bench_decode(spec, device, dtype, rounds=max(3, r // 3), compile=compile)]
    return out


def _save(folder: Path, name: str, text: str, payload: dict) -> None:
    from ..report import atomic_write_text

    atomic_write_text(folder / f"{name}.md", text)
    atomic_write_text(folder / f"{name}.json", json.dumps(payload, indent=2) + "\n")


def _kernels(args: argparse.Namespace) -> int:
    from ..bench.kernels import ARCHS, REGISTER_BOUND, available, compile_all

    why = available()
    if why is not None:
        raise ValueError(f"kvshift bench kernels: {why}")
    rows = compile_all(archs=tuple(args.arch or ARCHS), full=True, progress=True)
    cols = ["arch", "name", "num_warps", "block_t", "registers", "spills", "sass_instructions", "sass_per_element"]
    worst = max(rows, key=lambda r: r["registers"])
    spilling = [r["name"] for r in rows if r["spills"]]
    hw = environment()
    lines = ["# kvshift bench kernels (ahead-of-time compile, no GPU)", "", *[f"- {k}: {v}" for k, v in hw.items()],
             f"- {len(rows)} specialisations; most registers: {worst['registers']} ({worst['arch']} {worst['name']}); "
             f"bound {REGISTER_BOUND}; spilling: {', '.join(spilling) or 'none'}",
             "- sass_per_element: static SASS instructions x threads / elements of the program's tile", "",
             markdown_table(rows, cols, digits=2).rstrip("\n")]
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        _save(Path(args.out), "kernels", text, {"bench": "kernels", "hardware": hw, "register_bound": REGISTER_BOUND,
                                                "results": rows})
    over = [r for r in rows if r["spills"] or r["registers"] > REGISTER_BOUND]
    return 1 if over else 0


def run(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        return _kernels(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.what == "gpu":  # every benchmark at the GPU shapes; the GPU tests run from scripts/gpu_check.sh
        if not torch.cuda.is_available():
            raise ValueError("kvshift bench gpu needs a CUDA GPU (none is visible)")
        what = "all"
    else:
        what = args.what
    hw = environment()
    results = run_benchmarks(what, device, args.rounds)
    lines = [f"# kvshift bench {what} ({device.type})", "", *[f"- {k}: {v}" for k, v in hw.items()], ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", _table(rows)]
    text = "\n".join(lines)
    print(text)
    payload = {"bench": what, "device": device.type, "hardware": hw, "results": results}
    if not args.no_save:
        _save(Path(args.out), f"{what}-{device.type}", text, payload)
    print(json.dumps(payload))
    return 0
