"""The GPU check's probe runs every check end to end on CPU in its dry run (tiny shapes, Triton interpreted),
and a check that fails is a row saying so, not an exception that hides the checks after it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from builders import interpret_triton_kernels  # noqa: E402

from kvshift.bench import probe  # noqa: E402
from kvshift.cli import main  # noqa: E402
from kvshift.ops.kv_shift import triton as kernels  # noqa: E402

interpret_triton_kernels(kernels)


def test_dry_run_probe_passes_every_check():
    rows = list(probe.run_probe(torch.device("cpu"), dry_run=True))
    assert [r["check"] for r in rows] == list(probe.CHECKS)
    failed = {r["check"]: r.get("error") for r in rows if not r["ok"]}
    assert not failed
    decode = rows[2]
    assert decode["static_cache_dtype"] == decode["dynamic_cache_dtype"] == "bfloat16"
    assert rows[3]["cudagraph_skips"] == 0


def test_a_failing_check_is_a_row(monkeypatch):
    def broken(device, dry_run):
        raise RuntimeError("index_copy_(): self and source expected to have the same dtype")

    monkeypatch.setitem(probe.CHECKS, "prefill_decode_autocast", broken)
    rows = list(probe.run_probe(torch.device("cpu"), dry_run=True, names=["prefill_decode_autocast",
                                                                          "offsets_2^31"]))
    assert rows[0]["ok"] is False and "same dtype" in rows[0]["error"]
    assert rows[1]["ok"] is True


def test_dry_run_is_for_the_gpu_parts_only(capsys):
    assert main(["bench", "layer", "--dry-run", "--no-save"]) == 2
    assert "--dry-run" in capsys.readouterr().err
