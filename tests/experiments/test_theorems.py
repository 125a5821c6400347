"""Tests of the Theorem 2 construction, the Theorem 3 closed form and the experiment result writers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvshift.experiments.common import ROW_COLUMNS, write_results
from kvshift.experiments.theorem2 import (
    evaluate_theorem2,
    ih_reference,
    max_ih_deviation,
    random_embeddings,
    run_theorem2,
    theorem2_head,
)
from kvshift.experiments.theorem3 import gradient_flow, run_theorem3, theorem3_grid, theorem3_loss
from kvshift.report import markdown_table, mean_std
from kvshift.tasks import InductionTask

FILES = ("results.json", "results.md", "config.json")


def _check_outputs(out, name: str, plot: str) -> dict:
    for f in (*FILES, plot):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "results.json").read_text())
    assert payload["experiment"] == name and payload["rows"]
    for row in payload["rows"]:
        assert set(ROW_COLUMNS) <= set(row)
        assert isinstance(row["model"], str) and isinstance(row["metric"], str)
        assert (
            isinstance(row["layers"], int)
            and isinstance(row["kv_shift"], bool)
            and isinstance(row["seeds"], int)
        )
        assert isinstance(row["mean"], float) and isinstance(row["std"], float)
    assert json.loads((out / "config.json").read_text())["experiment"] == name
    md = (out / "results.md").read_text()
    assert "| model | layers | kv_shift | metric | mean | std | seeds |" in md
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    return payload


# ----------------------------------------------------------------------------- Theorem 3


@pytest.mark.parametrize(
    ("o_t", "l01", "l10", "span"),
    [(0.0, 1.178, 1.386, 0.49), (10.0, 2.489, 2.596, 0.13), (100.0, 4.619, 4.635, 0.017)],
)
def test_theorem3_closed_form_numbers(o_t: float, l01: float, l10: float, span: float) -> None:
    assert float(theorem3_loss(0.0, 1.0, o_t)) == pytest.approx(l01, abs=1e-3)
    assert float(theorem3_loss(1.0, 0.0, o_t)) == pytest.approx(l10, abs=1e-3)
    A, B, L = theorem3_grid(o_t, 101)
    assert L.shape == (101, 101)
    i = int(L.argmin())
    assert (float(A.flatten()[i]), float(B.flatten()[i])) == (0.0, 1.0)
    assert float(L.max() - L.min()) == pytest.approx(span, rel=0.03)


def test_theorem3_loss_broadcasts_and_is_a_log_softmax() -> None:
    a = torch.linspace(0, 1, 5)
    assert theorem3_loss(a, 1.0, 10.0).shape == (5,)
    assert theorem3_loss(0.5, torch.zeros(3, 1), 0.0).shape == (3, 1)
    assert bool((theorem3_loss(a[:, None], a[None], 3.0) > 0).all())  # -log of a probability < 1
    # alpha1 = beta1 = 1/2 by hand: S = 3e^{1/2}, a1 = a2 = 1/3; the target logit 1/6 + 1/(2S) equals the
    # second one (counted twice), the third is 2/6 + 1/6 = 1/2: L = log(1 + 2 + e^{1/2 - z})
    z = 1 / 6 + 0.5 / (3 * math.exp(0.5))
    assert float(theorem3_loss(0.5, 0.5, 0.0)) == pytest.approx(math.log(3 + math.exp(0.5 - z)), abs=1e-12)


def test_theorem3_gradient_flow_reaches_induction_solution() -> None:
    g = torch.Generator().manual_seed(0)
    starts = torch.rand(32, 2, generator=g, dtype=torch.float64)
    for o_t in (0.0, 10.0, 100.0):
        ends, path = gradient_flow(starts, o_t, steps=1500, record_every=500)
        assert path is not None and path.shape == (4, 32, 2)
        assert bool(((ends >= 0) & (ends <= 1)).all())
        frac = float(
            ((ends - torch.tensor([0.0, 1.0], dtype=torch.float64)).norm(dim=1) < 0.05).double().mean()
        )
        assert frac > 0.5, (o_t, frac)
        # starts already in the induction basin (high beta1, low alpha1) always converge
        close, _ = gradient_flow(torch.tensor([[0.2, 0.8], [0.1, 0.5]], dtype=torch.float64), o_t, steps=1500)
        assert float((close - torch.tensor([0.0, 1.0], dtype=torch.float64)).abs().max()) < 0.05


def test_run_theorem3_quick(tmp_path) -> None:
    out = tmp_path / "t3"
    res = run_theorem3(quick=True, seeds=1, out_dir=out, starts_per_seed=16, steps=600)
    payload = _check_outputs(out, "theorem3", "theorem3.png")
    assert res["markdown"].startswith("| model")
    assert set(payload["per_o"]) == {"0", "10", "100"}
    for v in payload["per_o"].values():
        assert v["argmin"] == [0.0, 1.0] and v["argmin_is_induction_solution"]
        assert {"span", "loss_at_0_1", "loss_at_1_0", "fraction_converged"} <= set(v)
    rows = {(r["model"], r["metric"]): r["mean"] for r in payload["rows"]}
    assert rows[("closed form, O(T)=0", "loss at (0,1)")] == pytest.approx(1.178, abs=1e-3)
    assert rows[("closed form, O(T)=100", "loss at (1,0)")] == pytest.approx(4.635, abs=1e-3)


# ----------------------------------------------------------------------------- Theorem 2

TASK = InductionTask(vocab_size=1000, seq_len=96, pool_size=48, seed=0)


def test_theorem2_head_equals_definition_1() -> None:
    dev = max_ih_deviation(seed=0, d=64, sigma=1e-3, slope=1.0, task=TASK, num_seqs=1, boundary="exact")
    assert dev["all"] < 1e-9 and dev["induction"] < 1e-9
    causal = max_ih_deviation(seed=0, d=64, sigma=1e-3, slope=1.0, task=TASK, num_seqs=1, boundary="causal")
    assert causal["induction"] < 1e-6  # the boundary keys only matter where nothing matches


def test_theorem2_head_reads_successor() -> None:
    g = torch.Generator().manual_seed(0)
    E = random_embeddings(20, 128, g)
    ids = torch.tensor([[3, 7, 9, 4, 7]])  # the last 7 repeats position 1: its successor is 9
    o = theorem2_head(E[ids], sigma=1e-3, slope=1.0)
    assert int((o[0, -1] @ E.T).argmax()) == 9
    o_vanilla = theorem2_head(E[ids], sigma=1e-3, slope=1.0, kv_shift=False)
    assert int((o_vanilla[0, -1] @ E.T).argmax()) == 7  # copies the current token
    x = E[ids][0]
    assert torch.allclose(
        theorem2_head(E[ids], sigma=0.1, slope=0.5, boundary="exact")[0, 4],
        ih_reference(x, 4, sigma=0.1, slope=0.5),
        atol=1e-12,
    )


@pytest.mark.parametrize("boundary", ["causal", "exact"])
def test_theorem2_accuracy(boundary: str) -> None:
    kw = {
        "seed": 1,
        "d": 128,
        "sigma": 1e-4,
        "slope": 1.0,
        "task": TASK,
        "num_seqs": 16,
        "queries_per_seq": 16,
        "boundary": boundary,
    }
    shift = evaluate_theorem2(kv_shift=True, **kw)
    vanilla = evaluate_theorem2(kv_shift=False, **kw)
    assert shift["accuracy"] >= 0.99 and shift["first_accuracy"] >= 0.99
    assert vanilla["accuracy"] < 0.5
    assert vanilla["copy_current_rate"] > 0.9
    assert shift["queries"] == vanilla["queries"] > 100


def test_run_theorem2_quick(tmp_path) -> None:
    out = tmp_path / "t2"
    res = run_theorem2(
        quick=True,
        seeds=2,
        out_dir=out,
        num_seqs=8,
        queries_per_seq=8,
        sigmas=[1e-4, 1.0],
        dims=[16, 64],
        seq_len=64,
    )
    payload = _check_outputs(out, "theorem2", "theorem2.png")
    assert res["markdown"] == markdown_table(payload["rows"], ROW_COLUMNS)
    acc = {
        (r["model"], r["kv_shift"]): r["mean"] for r in payload["rows"] if r["metric"] == "induction accuracy"
    }
    assert len(acc) == 3
    for (name, shift), value in acc.items():
        assert (value >= 0.99) if shift else (value < 0.5), (name, value)
    assert {"sweep_sigma", "sweep_d", "per_variant", "ih_deviation"} <= set(payload)
    assert json.loads((out / "config.json").read_text())["seq_len"] == 64


# ----------------------------------------------------------------------------- common


def test_common_helpers(tmp_path) -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
    rows = [
        {"model": "a|b", "layers": 1, "kv_shift": True, "metric": "acc", "mean": 0.5, "std": 1e-5, "seeds": 3}
    ]
    md = markdown_table(rows, ROW_COLUMNS)
    assert md.splitlines()[2] == "| a\\|b | 1 | yes | acc | 0.5000 | 1.000e-05 | 3 |"
    payload = write_results(
        tmp_path / "r", "demo", rows, {"x": (1, 2)}, {"notes": "hello", "value": float("nan")}
    )
    assert payload["value"] is None  # strict JSON
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"x": [1, 2]}
    assert "- hello" in (tmp_path / "r" / "results.md").read_text()
    with pytest.raises(ValueError):
        write_results(tmp_path / "r", "demo", [{"model": "a"}], {})
