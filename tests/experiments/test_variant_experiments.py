"""`reproduce ablations / relatives / scaling`: what they run, what they write, and their arithmetic."""

from __future__ import annotations

import json

import pytest
from builders import tiny_config

from kvshift.experiments.variants import (
    ABLATIONS,
    RELATIVES,
    extra_flops_per_token,
    non_embedding_params,
    run_scaling,
    run_variant_experiment,
    scaling_plan,
    summarise,
)
from kvshift.models.configuration import TOKEN_MIXING_VARIANTS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kvshift.data.shards import prepare

    root = tmp_path_factory.mktemp("variants-data")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * 3}\n" * 30)
    prepare(str(corpus), root / "data", vocab_size=300, val_fraction=0.2)
    return str(root / "data")


def test_the_experiments_cover_what_the_paper_and_the_issue_name():
    assert set(ABLATIONS) == {"vanilla", "kv", "k", "v", "qkv", "kv-gate", "kv-clamp", "kv-w3"}
    assert {"vanilla", "kv", "kv-w3", "kv-w4", "kv-channel", "kv-channel-w3", "kv-channel-w4", "canon-b", "primer",
            "smear"} == set(RELATIVES)
    assert set(ABLATIONS) | set(RELATIVES) <= set(TOKEN_MIXING_VARIANTS)


def test_extra_flops_per_token():
    H, Hkv, D, L = 4, 2, 8, 2
    assert extra_flops_per_token(tiny_config(kv_shift=False)) == 0
    assert extra_flops_per_token(tiny_config()) == L * 2 * (2 * 2 - 1) * Hkv * D  # 2 mults + 1 add per element
    assert extra_flops_per_token(tiny_config(kv_shift=[True, False])) == 2 * 3 * Hkv * D
    canon = tiny_config(**TOKEN_MIXING_VARIANTS["canon-b"])
    assert extra_flops_per_token(canon) == L * (2 * 4) * (H + 2 * Hkv) * D  # 7 for the conv + 1 residual add
    smear = tiny_config(**TOKEN_MIXING_VARIANTS["smear"])
    assert extra_flops_per_token(smear) == 2 * 24 + 2 + 2 * 32


def test_summary_pairs_by_seed():
    runs = [{"workload": "lm", "variant": v, "seed": s, "metric": m, "diverged": False, "params": 1,
             "extra_flops_per_token": 0}
            for v, ms in (("vanilla", [3.0, 2.0, 4.0]), ("kv", [2.9, 1.8, 4.0]), ("k", [3.1, 2.1, 3.9]))
            for s, m in enumerate(ms)]
    rows = {r["variant"]: r for r in summarise(runs)}
    assert "vs_vanilla_diff" not in rows["vanilla"]
    assert rows["kv"]["vs_vanilla_diff"] == pytest.approx(-0.1)
    assert rows["kv"]["vs_vanilla_better_in"] == 2  # the third seed is a tie
    assert rows["k"]["vs_kv_diff"] == pytest.approx((0.2 + 0.3 - 0.1) / 3)
    assert rows["kv"]["mean"] == pytest.approx(8.7 / 3)


def test_variant_experiment_tiny_end_to_end(tmp_path, data_dir):
    out = tmp_path / "out"
    variants = ["vanilla", "kv", "canon-b", "smear"]
    payload = run_variant_experiment("relatives", variants, quick=True, seeds=2, out_dir=out, steps=3, data=data_dir)
    for name in ("results.json", "results.md", "config.json", "relatives.png"):
        assert (out / name).exists(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    for w in ("lm", "induction"):
        assert [r["variant"] for r in rows if r["workload"] == w] == variants
    for r in rows:
        assert r["seeds"] == 2 and r["diverged"] == 0 and r["params"] > 0
        assert {"model", "layers", "kv_shift", "metric", "mean", "std", "extra_flops_per_token"} <= set(r)
        if r["variant"] != "vanilla":
            assert {"vs_vanilla_diff", "vs_vanilla_p_signflip", "vs_vanilla_better_in"} <= set(r)
        if r["variant"] not in ("vanilla", "kv"):
            assert "vs_kv_diff" in r
    lm = {r["variant"]: r for r in rows if r["workload"] == "lm"}
    assert lm["vanilla"]["extra_flops_per_token"] == 0 < lm["kv"]["extra_flops_per_token"]
    assert lm["canon-b"]["params"] > lm["kv"]["params"] > lm["vanilla"]["params"]
    # the paired difference is the mean of the per-seed differences of the runs it reports
    by = {(r["variant"], r["seed"]): r["metric"] for r in payload["runs"] if r["workload"] == "lm"}
    want = sum(by[("kv", s)] - by[("vanilla", s)] for s in range(2)) / 2
    assert lm["kv"]["vs_vanilla_diff"] == pytest.approx(want)
    assert not list((out / "runs").rglob("model.safetensors"))
    with pytest.raises(FileExistsError):
        run_variant_experiment("relatives", variants, quick=True, seeds=1, out_dir=out, steps=1, data=data_dir)
    with pytest.raises(ValueError, match="unknown variant"):
        run_variant_experiment("relatives", ["kv", "nope"], quick=True, seeds=1, out_dir=tmp_path / "x", steps=1,
                               data=data_dir)


def test_scaling_plan_fixes_tokens_per_parameter():
    for quick in (True, False):
        for workload, sizes in scaling_plan(quick).items():
            assert len(sizes) >= 3
            ratios = [p["tokens"] / p["non_embedding_params"] for p in sizes]
            assert max(ratios) / min(ratios) < 1.1, (workload, ratios)  # equal up to rounding of the steps
            assert [p["non_embedding_params"] for p in sizes] == sorted(p["non_embedding_params"] for p in sizes)
    assert non_embedding_params(128, 2, 352) == 2 * (4 * 128 * 128 + 3 * 128 * 352 + 256) + 128


def test_scaling_tiny_end_to_end(tmp_path, data_dir):
    out = tmp_path / "scaling"
    run_scaling(seeds=2, out_dir=out, steps=2, data=data_dir)
    for name in ("results.json", "results.md", "config.json", "scaling.png"):
        assert (out / name).exists(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    plan = scaling_plan(True)
    assert {(r["workload"], r["size"], r["arm"]) for r in rows} == {
        (w, p["size"], a) for w in plan for p in plan[w] for a in ("vanilla", "kv")}
    kv = [r for r in rows if r["arm"] == "kv"]
    assert all(r["vs_vanilla_pairs"] == 2 and "vs_vanilla_p_signflip" in r for r in kv)
    assert all(r["steps"] == 2 and r["non_embedding_params"] > 0 for r in rows)


@pytest.mark.parametrize("which", ["ablations", "relatives"])
def test_the_named_experiments_run_every_variant(tmp_path, data_dir, which):
    from kvshift.experiments.variants import run_ablations, run_relatives

    fn, variants = (run_ablations, ABLATIONS) if which == "ablations" else (run_relatives, RELATIVES)
    out = tmp_path / which
    fn(seeds=1, steps=1, out_dir=out, data=data_dir)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows if r["workload"] == "lm"] == variants
    assert [r["variant"] for r in rows if r["workload"] == "induction"] == variants
    assert (out / f"{which}.png").stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert config["variants"] == {v: TOKEN_MIXING_VARIANTS[v] for v in variants}


def test_reproduce_data_option(tmp_path, data_dir):
    from kvshift.commands.reproduce import run_experiment

    with pytest.raises(FileNotFoundError, match="--data"):
        run_experiment("ablations", steps=1, seeds=1, out=tmp_path, data=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        run_experiment("ablations", steps=1, seeds=1, out=tmp_path, data=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--data: induction"):
        run_experiment("induction", steps=1, seeds=1, out=tmp_path, data=data_dir)
    run_experiment("scaling", steps=1, seeds=1, out=tmp_path, data=data_dir)
    rows = json.loads((tmp_path / "scaling" / "results.json").read_text())["rows"]
    corpus = json.loads((__import__("pathlib").Path(data_dir) / "meta.json").read_text())["splits"]["train"]["tokens"]
    for r in rows:
        if r["workload"] == "lm":
            assert r["epochs"] == pytest.approx(r["tokens"] / corpus, rel=0.01)
        else:
            assert r["epochs"] is None
