"""Ahead-of-time compilation of every Triton kernel specialisation the model uses, for NVIDIA targets, with no
GPU present: registers, spills and SASS instructions per element (``kvshift bench kernels``).

Triton lowers a kernel for a named ``GPUTarget`` without a device; its wheel ships ``ptxas`` (PTX -> cubin)
and ``cuobjdump`` (resource usage, SASS), which is all this needs. The specialisations mirror the launches
of :mod:`kvshift.ops.kv_shift.triton`: block sizes from its ``_blocks`` (at a long sequence, the largest
tile), pointer and integer arguments that are multiples of 16 marked as such (as Triton's launcher does
at run time for aligned tensors and head dims).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

__all__ = ["ARCHS", "HEAD_DIMS", "REGISTER_BOUND", "KernelSpec", "available", "specialisations", "compile_kernel",
           "compile_kernels", "compile_all"]

ARCHS = (80, 90)  # A100, H100/H200
HEAD_DIMS = (64, 72, 80, 96, 128, 256)  # 72: not a multiple of 16
# Registers per thread every specialisation must stay under (with zero spills). Measured with Triton 3.9:
# at most 128 on sm_80 / sm_90 (bf16 backward with RoPE; benchmarks/results/kernels.md), after fp32
# tiles moved to 8 warps (with 4 they took up to 168). 144 leaves room for compiler drift and keeps
# three 4-warp programs resident per SM (65536 / (144 * 128) = 3.6).
REGISTER_BOUND = 144
_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    kernel: str  # "fwd" | "bwd"
    dtype: str  # "bfloat16" | "float32" (x, output, prev and their gradients; RoPE tables alike)
    head_dim: int
    rope: bool
    keep: bool  # a [B, T] keep mask (padding / document starts)
    prev: bool  # a decode / chunked-prefill predecessor
    sdpa_layout: bool  # output [B, H, T, D] (the model's fused path) or [B, T, H, D] (the plain op)

    @property
    def name(self) -> str:
        flags = [f for f, on in (("rope", self.rope), ("keep", self.keep), ("prev", self.prev),
                                 ("sdpa", self.sdpa_layout)) if on]
        return f"{self.kernel} {self.dtype} D={self.head_dim} " + ("+".join(flags) or "plain")


@functools.cache
def available() -> str | None:
    """None when kernels can be compiled here, else why not (no Triton, no NVIDIA backend)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        return f"Triton is not installed ({err})"
    if _tool("cuobjdump") is None:
        return "Triton's NVIDIA backend tools (cuobjdump, ptxas) are not available"
    return None


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def specialisations(full: bool = True) -> Iterator[KernelSpec]:
    """What the model launches: keys with RoPE and values without, in the SDPA layout, with and without a
    keep mask and a predecessor, forward and backward, bf16 and fp32, every head dim of ``HEAD_DIMS``;
    plus the plain op (``kv_shift``, ``[B, T, H, D]`` out, no RoPE). ``full=False``: the worst case of each
    (keep mask and predecessor on) at D 64 and 128, the subset the default test suite compiles."""
    dims = HEAD_DIMS if full else (64, 128)
    flags = [(True, True), (False, False), (True, False), (False, True)] if full else [(True, True)]
    for kernel in ("fwd", "bwd"):
        for dtype in _DTYPES:
            for d in dims:
                for keep, prev in flags:
                    for rope in (True, False):
                        yield KernelSpec(kernel, dtype, d, rope, keep, prev, True)
                    if full:
                        yield KernelSpec(kernel, dtype, d, False, keep, prev, False)


def _signature(fn, spec: KernelSpec) -> tuple[dict, dict, dict]:
    from ..ops.kv_shift import triton as kernels

    x = _DTYPES[spec.dtype]
    pointer = {"X": x, "Y": x, "PREV": x, "G": x, "GX": x, "GPREV": x, "COS": x, "SIN": x,
               "W": "fp32", "KEEP": "u8", "GW_PART": "fp32"}
    block_t, block_d = kernels._blocks(1 << 20, spec.head_dim, spec.rope)  # a long sequence: the full tile
    constexprs = {"HAS_ROPE": spec.rope, "HAS_KEEP": spec.keep, "HAS_PREV": spec.prev,
                  "SDPA_LAYOUT": spec.sdpa_layout, "BLOCK_T": block_t, "BLOCK_D": block_d, "D": spec.head_dim}
    signature, divisible = {}, []
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointer:
            signature[arg] = "*" + pointer[arg]
            divisible.append(i)  # torch allocations are 16-byte aligned
        else:
            signature[arg] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    return signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    code = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line)]
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)), "sass_instructions": len(code),
            # subroutine calls: e.g. the 64-bit integer division routine that int64 index math pulls in
            "calls": sum(1 for line in code if re.search(r"\bCALL\b", line))}


def compile_kernel(spec: KernelSpec, arch: int) -> dict:
    """Compile one specialisation for ``sm_<arch>``; its registers, spills (local memory / stack bytes),
    SASS instructions, and instructions per element of the program's tile."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..ops.kv_shift import triton as kernels

    fn = kernels._kv_shift_fwd_kernel if spec.kernel == "fwd" else kernels._kv_shift_bwd_kernel
    signature, constexprs, attrs = _signature(fn, spec)
    warps = kernels._num_warps(getattr(torch, spec.dtype), constexprs["BLOCK_T"], constexprs["BLOCK_D"])
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "enable_fp_fusion": True})  # Triton's default
    usage = _resource_usage(compiled.asm["cubin"])
    elements = constexprs["BLOCK_T"] * spec.head_dim
    threads = 32 * compiled.metadata.num_warps
    return {**asdict(spec), "name": spec.name, "arch": f"sm_{arch}", "num_warps": compiled.metadata.num_warps,
            "block_t": constexprs["BLOCK_T"], "block_d": constexprs["BLOCK_D"], **usage,
            "spills": usage["local_bytes"] + usage["stack_bytes"],
            "sass_per_element": usage["sass_instructions"] * threads / elements}


def _interpreted() -> bool:
    """Whether this process runs Triton kernels in the CPU interpreter (then they cannot be compiled)."""
    from triton.runtime.jit import JITFunction

    from ..ops.kv_shift import triton as kernels

    return not isinstance(kernels._kv_shift_fwd_kernel, JITFunction)


def compile_kernels(todo: list[tuple[KernelSpec, int]], progress: bool = False) -> list[dict]:
    """:func:`compile_kernel` for each ``(spec, arch)``; in a child process without ``TRITON_INTERPRET``
    when this one interprets kernels (as the CPU test suite does)."""
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        job = json.dumps([[asdict(spec), arch] for spec, arch in todo])
        out = subprocess.run([sys.executable, "-m", "kvshift.bench.kernels"], input=job, capture_output=True,
                             text=True, env=env, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="compiling kernels", unit="kernel")
    return [compile_kernel(spec, arch) for spec, arch in todo]


def compile_all(archs=ARCHS, full: bool = True, progress: bool = False) -> list[dict]:
    """:func:`compile_kernel` over ``archs`` x :func:`specialisations`."""
    return compile_kernels([(spec, arch) for arch in archs for spec in specialisations(full)], progress)


if __name__ == "__main__":  # the child of compile_kernels: JSON jobs on stdin, JSON rows on stdout
    jobs = [(KernelSpec(**spec), arch) for spec, arch in json.loads(sys.stdin.read())]
    print(json.dumps([compile_kernel(spec, arch) for spec, arch in jobs]))
