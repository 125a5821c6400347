"""`kvshift bench` saves each benchmark's rows as soon as it finishes, and the GPU check's parts add up in
one all-cuda.{md,json} (benchmark functions replaced by stubs: the command's bookkeeping is under test)."""

from __future__ import annotations

import json

import pytest
import torch

from kvshift.bench import model as model_bench
from kvshift.bench import op as op_bench
from kvshift.cli import main


def test_rows_are_saved_before_a_later_benchmark_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(op_bench, "bench_op", lambda *a, **k: [{"bench": "op", "shape": "s", "ratio": 1.01}])

    def boom(*args, **kwargs):
        raise RuntimeError("the slot ran out")

    monkeypatch.setattr(model_bench, "bench_layer", boom)
    with pytest.raises(RuntimeError, match="slot"):
        main(["bench", "all", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "all-cpu.json").read_text())
    assert saved["results"] == {"op": [{"bench": "op", "shape": "s", "ratio": 1.01}] * len(op_bench.CPU_SHAPES)}
    assert "1.010" in (tmp_path / "all-cpu.md").read_text()


def test_gpu_parts_add_up_in_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from kvshift.commands import bench as bench_command

    monkeypatch.setattr(bench_command, "environment", lambda: {"gpu": "stub"})
    monkeypatch.setattr(op_bench, "bench_op", lambda *a, **k: [{"bench": "op", "ratio": 1.0}])
    monkeypatch.setattr(model_bench, "bench_layer", lambda *a, **k: [{"bench": "layer", "ratio": 1.1}])
    monkeypatch.setattr(model_bench, "bench_train_step", lambda *a, **k: {"bench": "model", "ratio": 0.99})
    assert main(["bench", "gpu-op", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert main(["bench", "gpu-train", "--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "all-cuda.json").read_text())
    assert set(saved["results"]) == {"op", "layer", "model"}
    md = (tmp_path / "all-cuda.md").read_text()
    assert "## op" in md and "## layer" in md and "## model" in md


def test_gpu_parts_need_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu-decode", "--no-save"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_vllm_outside_the_serving_env_says_how_to_get_it(capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/serving covers the benchmark")
    from kvshift.cli import main

    assert main(["bench", "vllm", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "bash scripts/setup.sh --serve" in err and ".venv-serve/bin/kvshift bench vllm" in err


def test_bench_vllm_hf_batch_sizes_parse_and_bad_values_exit_2(capsys):
    from kvshift.cli import main
    from kvshift.commands.bench import parse_batch_sizes

    assert parse_batch_sizes("1,8") == (1, 8) and parse_batch_sizes("8") == (8,)
    assert parse_batch_sizes("none") == () and parse_batch_sizes("NONE") == ()
    for bad in ("0", "1,x", "-2", ","):
        assert main(["bench", "vllm", "--no-save", "--hf-batch-sizes", bad]) == 2
        assert "--hf-batch-sizes" in capsys.readouterr().err
