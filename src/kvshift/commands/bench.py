"""`kvshift bench op|layer|model|decode|all|gpu|kernels|vllm`: ratios against vanilla attention in one run, tables
+ JSON; `kernels` compiles every Triton kernel specialisation for NVIDIA targets ahead of time (no GPU needed);
`vllm` times vLLM serving against HF generate (in the serving env)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..report import environment, markdown_table

__all__ = ["add_arguments", "run", "run_benchmarks"]

WHAT = ("op", "layer", "model", "decode", "all", "gpu", "gpu-op", "gpu-train", "gpu-decode", "probe", "kernels",
        "vllm")
# The GPU check's parts (scripts/gpu_check.sh): every row is added to the same all-cuda.{md,json} as soon as
# it is measured, so a step cut off by its time limit keeps what it measured.
GPU_PARTS = {"probe": ("probe",), "gpu-op": ("op", "layer"), "gpu-train": ("model",), "gpu-decode": ("decode",),
             "gpu": ("op", "layer", "model", "decode")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=WHAT,
                        help="which benchmark ('gpu': every benchmark at GPU shapes, or one part of it: gpu-op (op + "
                             "layer), gpu-train (training step), gpu-decode; 'kernels': compile every Triton kernel "
                             "specialisation for sm_80 / sm_90 ahead of time, no GPU needed; 'vllm': greedy tokens/s of vLLM vs "
                             "HF generate on the same prompts, in the serving env .venv-serve)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="vllm: a kvshift checkpoint folder (default: a seeded random 4-layer d-256 model)")
    parser.add_argument("--prompts", type=int, default=32, help="vllm: number of prompts, lengths 1-45 (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="vllm: greedy tokens per prompt (default: %(default)s)")
    parser.add_argument("--hf-batch-sizes", default="1,8", metavar="LIST",
                        help="vllm: HF generate baselines to time, comma-separated left-padded batch sizes, or 'none' "
                             "to time vLLM alone (default: %(default)s; batch 1 is the slow one on a real model)")
    parser.add_argument("--arch", type=int, action="append", default=None, metavar="SM",
                        help="kernels: target compute capability, e.g. 90 (repeatable; default: 80 and 90)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: each benchmark's own)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md / .json results (default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no files (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="probe / gpu parts: rehearse on CPU at tiny shapes (Triton in its interpreter, "
                             "TRITON_INTERPRET=1), one timing round (default: off)")


def _table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "bench"]
    if any(list(r) != list(rows[0]) for r in rows):  # rows of different kinds (the probe's checks)
        def details(r: dict) -> str:
            return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                             if k not in ("bench", "check", "ok", "seconds"))

        rows = [{"check": r.get("check"), "ok": r.get("ok"), "seconds": r.get("seconds"), "details": details(r)}
                for r in rows]
        cols = ["check", "ok", "seconds", "details"]
    return markdown_table(rows, cols, digits=3).rstrip("\n")


def run_benchmarks(what: str | tuple[str, ...], device: torch.device, rounds: int | None = None,
                   on_result=None, dry_run: bool = False) -> dict[str, list[dict]]:
    """Run the benchmarks named by ``what`` (one name, ``"all"``, or a tuple of names); ``on_result(name,
    rows)`` is called as soon as each row is measured (the command saves there, so a cut-off run keeps it).
    ``dry_run``: tiny shapes and one round (the GPU check's CPU rehearsal)."""
    from ..bench.model import CPU_MODEL, GPU_MODEL, TINY_MODEL, bench_decode, bench_layer, bench_train_step
    from ..bench.op import CPU_SHAPES, GPU_SHAPES, bench_op
    from ..bench.probe import run_probe

    names = ("op", "layer", "model", "decode") if what == "all" else ((what,) if isinstance(what, str) else what)
    cuda = device.type == "cuda"
    spec = TINY_MODEL if dry_run else (GPU_MODEL if cuda else CPU_MODEL)
    shapes = [(1, 2, 16, 16)] if dry_run else (GPU_SHAPES if cuda else CPU_SHAPES)
    dtype = torch.bfloat16 if cuda else torch.float32
    r = 1 if dry_run else (rounds or (30 if cuda else 15))
    timing = dict(warmup=1, rounds=1) if dry_run else dict(rounds=r)
    # a dry run traces the compiled variants without Inductor's (minutes-long) CPU code generation
    backend = "aot_eager" if dry_run else "inductor"
    runners = {
        "probe": lambda: run_probe(device, dry_run=dry_run),
        "op": lambda: (row for shape in shapes
                       for row in bench_op([shape], device=device, **(dict(warmup=1, iters=1) if dry_run else {}))),
        "layer": lambda: (row for impl in ("sdpa", "flex_attention")
                          for row in bench_layer(spec, device, dtype, impls=(impl,), **timing)),
        "model": lambda: [bench_train_step(spec, device, dtype if cuda else None, compile=cuda or dry_run,
                                           compile_backend=backend, **timing)],
        # eager (DynamicCache), then compiled (StaticCache + torch.compile fullgraph), one batch size a row
        "decode": lambda: (row for compile in (False, True) for B in ((2,) if dry_run else (1, 32))
                           for row in bench_decode(spec, device, dtype, batch_sizes=(B,), compile=compile,
                                                   compile_backend=backend,
                                                   **(dict(rounds=1, prompt=8, new_tokens=2) if dry_run
                                                      else dict(rounds=max(3, r // 3))))),
    }
    out: dict[str, list[dict]] = {}
    for name in names:
        out[name] = []
        for row in runners[name]():
            out[name].append(row)
            if on_result is not None:
                on_result(name, out[name])
    return out


def _render(what: str, device: str, hw: dict, results: dict[str, list[dict]]) -> str:
    lines = [f"# kvshift bench {what} ({device})", "", *[f"- {k}: {v}" for k, v in hw.items()], ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", _table(rows), ""]
    return "\n".join(lines)


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
    cols = ["arch", "name", "num_warps", "block_t", "registers", "spills", "calls", "sass_instructions",
            "sass_per_element"]
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


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--hf-batch-sizes``: "1,8" -> (1, 8); "none" -> () (time vLLM alone)."""
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--hf-batch-sizes must be comma-separated batch sizes >= 1 (e.g. 1,8) or 'none', got {text!r}")
    return sizes


def _vllm(args: argparse.Namespace) -> int:
    import importlib.util
    import tempfile

    if args.prompts < 1 or args.new_tokens < 1:
        raise ValueError(f"--prompts and --new-tokens must be >= 1, got {args.prompts} and {args.new_tokens}")
    batch_sizes = parse_batch_sizes(args.hf_batch_sizes)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("kvshift bench vllm needs vLLM, which lives in its own environment: run "
                         "`bash scripts/setup.sh --serve`, then `.venv-serve/bin/kvshift bench vllm`")
    from ..serving.offline import bench_vllm, demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = demo_checkpoint(str(Path(tmp) / "demo"))
        elif not (Path(model) / "config.json").is_file():
            raise ValueError(f"--model {model!r} is not a checkpoint folder (no config.json)")
        rows = bench_vllm(model, num_prompts=args.prompts, max_new_tokens=args.new_tokens, hf_batch_sizes=batch_sizes)
    import vllm

    hw = {**environment(), "vllm": vllm.__version__}
    load = rows[-1].pop("load_s")
    label = args.model or "seeded random 4-layer d-256 kvshift model (bench default)"
    text = "\n".join(["# kvshift bench vllm (cpu)", "", *[f"- {k}: {v}" for k, v in hw.items()],
                      f"- model: {label}",
                      f"- {args.prompts} prompts of 1-45 random ids (fewer where the context is short), {args.new_tokens} greedy tokens each, fp32; "
                      f"vLLM engine load (not timed above): {load:.1f} s", "", _table(rows)])
    print(text)
    if not args.no_save:
        # the default model's table is vllm-cpu; a given model's sits beside it, named after its folder
        name = "vllm-cpu" if args.model is None else f"vllm-cpu-{Path(args.model).resolve().name}"
        _save(Path(args.out), name, text, {"bench": "vllm", "model": label, "hardware": hw, "load_seconds": load,
                                                   "results": rows})
    return 0


def run(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        return _kernels(args)
    if args.what == "vllm":
        return _vllm(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run and args.what not in GPU_PARTS:
        raise ValueError(f"--dry-run rehearses the GPU check's parts ({', '.join(GPU_PARTS)}), not {args.what!r}")
    if args.what in GPU_PARTS:  # the GPU tests run from scripts/gpu_check.sh, not from here
        if args.dry_run:
            device = torch.device("cpu")
        elif not torch.cuda.is_available():
            raise ValueError(f"kvshift bench {args.what} needs a CUDA GPU (none is visible); "
                             f"--dry-run rehearses it on CPU")
        names, stem = GPU_PARTS[args.what], "all-cuda"
    else:
        names, stem = args.what, f"{args.what}-{device.type}"
    hw = environment()
    folder = Path(args.out)
    saved: dict[str, list[dict]] = {}
    if stem == "all-cuda" and (folder / f"{stem}.json").exists():  # parts of one GPU check add up
        try:
            saved = json.loads((folder / f"{stem}.json").read_text()).get("results", {})
        except (OSError, ValueError):
            saved = {}

    def save(name: str, rows: list[dict]) -> None:
        if args.no_save:
            return
        saved[name] = rows
        label = ("all, dry run on CPU" if args.dry_run else "all") if stem == "all-cuda" else args.what
        _save(folder, stem, _render(label, device.type, hw, saved),
              {"bench": label, "device": device.type, "hardware": hw, "results": saved})

    results = run_benchmarks(names, device, args.rounds, on_result=save, dry_run=args.dry_run)
    print(_render(args.what, device.type, hw, results))
    print(json.dumps({"bench": args.what, "device": device.type, "hardware": hw, "results": results}))
    failed = [r["check"] for r in results.get("probe", []) if not r.get("ok")]
    if failed:
        print(f"probe: failed checks: {', '.join(failed)}")
    return 1 if failed else 0
