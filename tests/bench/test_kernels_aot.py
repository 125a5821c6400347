"""Every Triton kernel specialisation the model uses compiles for sm_80 / sm_90 ahead of time, with no GPU:
zero spills, registers under the stated bound, and no subroutine calls (int64 index math pulls in a 64-bit
division routine; the kernels derive (b, t) from the grid instead). The default suite compiles the worst
case of each kernel; `kvshift bench kernels` compiles all of them."""

from __future__ import annotations

import pytest

kernels_aot = pytest.importorskip("kvshift.bench.kernels")
if kernels_aot.available() is not None:
    pytest.skip(kernels_aot.available(), allow_module_level=True)

from kvshift.bench.kernels import REGISTER_BOUND, KernelSpec, compile_kernels, specialisations  # noqa: E402

QUICK = [s for s in specialisations(full=False) if s.head_dim == 128] + [
    KernelSpec("fwd", "bfloat16", 80, True, True, True, True),  # D not a power of two: masked columns
    KernelSpec("bwd", "bfloat16", 80, True, True, True, True),
    KernelSpec("fwd", "bfloat16", 72, True, True, True, True),  # D not a multiple of 16 (was 1360 SASS, 127 regs)
    KernelSpec("bwd", "bfloat16", 72, True, True, True, True),  # (was 2392 SASS, 204 registers)
]


JOBS = [(spec, 90) for spec in QUICK] + [(spec, 80) for spec in QUICK if spec.dtype == "bfloat16" and spec.rope]


@pytest.fixture(scope="module")
def compiled():
    return compile_kernels(JOBS)  # one child process: the suite itself interprets kernels


def test_kernels_compile_without_spills_under_the_register_bound(compiled):
    assert len(compiled) == len(JOBS) and {r["arch"] for r in compiled} == {"sm_80", "sm_90"}
    for r in compiled:
        assert r["sass_instructions"] > 100, r
        assert r["spills"] == 0, f"{r['name']} spills {r['spills']} bytes on {r['arch']}"
        assert r["registers"] <= REGISTER_BOUND, f"{r['name']}: {r['registers']} registers on {r['arch']}"
        assert r["calls"] == 0, f"{r['name']} calls a subroutine (64-bit division?) on {r['arch']}"
    by_name = {(r["arch"], r["name"]): r for r in compiled}
    for kernel in ("fwd", "bwd"):  # a head dim of 72 vectorises like 80 (D is a compile-time constant)
        d72 = by_name[("sm_90", f"{kernel} bfloat16 D=72 rope+keep+prev+sdpa")]
        d80 = by_name[("sm_90", f"{kernel} bfloat16 D=80 rope+keep+prev+sdpa")]
        assert d72["sass_instructions"] <= 1.25 * d80["sass_instructions"], (d72, d80)


def test_specialisation_matrix_covers_what_the_model_launches():
    full = list(specialisations(full=True))
    assert {s.head_dim for s in full} == {64, 72, 80, 96, 128, 256}
    assert {s.dtype for s in full} == {"bfloat16", "float32"}
    assert {(s.rope, s.keep, s.prev) for s in full if s.sdpa_layout} == {
        (r, k, p) for r in (True, False) for k in (True, False) for p in (True, False)}
    assert {s.kernel for s in full} == {"fwd", "bwd"} and any(not s.sdpa_layout for s in full)
