"""`kvshift reproduce` end to end (tiny step counts), result files and fields, and the analysis helpers."""

from __future__ import annotations

import json

import pytest
import torch
from builders import tiny_model

from kvshift.cli import main
from kvshift.eval.heads import attention_maps, head_scores, repeated_sequence_loss, shift_table
from kvshift.experiments.compare import paired_stats

ROW_FIELDS = {"model": str, "layers": int, "kv_shift": bool, "metric": str, "mean": float, "std": float, "seeds": int}


def _check_outputs(folder, name):
    for f in ("results.json", "results.md", "config.json"):
        assert (folder / f).exists(), f
    assert list(folder.glob("*.png")), "no plot written"
    payload = json.loads((folder / "results.json").read_text())
    assert payload["experiment"] == name and payload["rows"]
    for row in payload["rows"]:
        for field, typ in ROW_FIELDS.items():
            assert isinstance(row[field], typ) or (typ is float and isinstance(row[field], int)), (field, row)
    json.loads((folder / "config.json").read_text())
    return payload


@pytest.mark.parametrize("name", ["induction", "induction-width", "ngram", "hopk"])
def test_reproduce_tiny_run_writes_all_files(tmp_path, name, capsys):
    assert main(["reproduce", name, "--steps", "2", "--seeds", "1", "--out", str(tmp_path)]) == 0
    payload = _check_outputs(tmp_path / name, name)
    assert "| model |" in capsys.readouterr().out
    models = {r["model"] for r in payload["rows"]}
    if name == "induction":
        assert models == {"vanilla-1L", "vanilla-2L", "vanilla-4L", "kvshift-1L"}
        assert payload["rows"][0]["seeds"] == 1


def test_induction_default_gives_the_one_layer_pair_six_paired_seeds(tmp_path):
    """Quick mode without --seeds: 6 seeds for vanilla-1L and kvshift-1L, 3 for the deeper baselines; seed s
    is the same run as in an experiment where every model has that many seeds (rows stay paired)."""
    from kvshift.experiments.toy import run_induction

    payload = run_induction(quick=True, steps=2, out_dir=tmp_path / "default")
    assert {r["model"]: r["seeds"] for r in payload["rows"]} == {
        "vanilla-1L": 6, "vanilla-2L": 3, "vanilla-4L": 3, "kvshift-1L": 6}
    runs = {(r["model"], r["seed"]): r["final"] for r in payload["runs"]}
    assert sorted(s for m, s in runs if m == "kvshift-1L") == list(range(6))
    assert sorted(s for m, s in runs if m == "vanilla-4L") == [0, 1, 2]
    every = run_induction(quick=True, steps=2, seeds=6, out_dir=tmp_path / "six")
    assert {r["seeds"] for r in every["rows"]} == {6}
    same = {(r["model"], r["seed"]): r["final"] for r in every["runs"]}
    assert all(same[key] == value for key, value in runs.items())
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["model_seeds"] == {"vanilla-1L": 6, "kvshift-1L": 6}


def test_model_seeds_must_name_trained_models(tmp_path):
    from kvshift.experiments.runner import run_task_experiment
    from kvshift.experiments.toy_train import ModelSpec, RunSpec
    from kvshift.tasks.induction import InductionTask, induction_accuracy

    task = InductionTask(vocab_size=32, seq_len=16, pool_size=8, reserved=3, seed=0)
    with pytest.raises(ValueError, match="model_seeds"):
        run_task_experiment("x", task, [ModelSpec("a", 1, True, 32, 2)], RunSpec(steps=1), induction_accuracy, "acc",
                            seeds=1, lr_grid=[1e-3], out_dir=tmp_path, eval_size=8, config={},
                            model_seeds={"b": 2})


@pytest.mark.parametrize("name", ["theorem2", "theorem3"])
def test_reproduce_theorems_write_all_files(tmp_path, name):
    assert main(["reproduce", name, "--seeds", "1", "--out", str(tmp_path)]) == 0
    _check_outputs(tmp_path / name, name)


def test_reproduce_rejects_bad_input(tmp_path):
    assert main(["reproduce", "induction", "--seeds", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["reproduce", "nope"])


def test_shift_table_counts_by_magnitude():
    m = tiny_model(num_hidden_layers=1, num_key_value_heads=4, num_attention_heads=4)
    with torch.no_grad():
        attn = m.model.layers[0].self_attn
        attn.k_shift.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, -1.0], [0.9, 0.2]]))
        attn.v_shift.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]]))
    t = shift_table(m)
    assert t["table"] == {"key_current/value_current": 1, "key_previous/value_current": 1,
                          "key_previous/value_previous": 1, "key_current/value_previous": 1}
    assert t["with_negative_weight"] == 1 and t["off_convex_line"] == 2 and t["diagonal"] == 2


def test_attention_maps_are_causal_distributions():
    m = tiny_model()
    maps = attention_maps(m, torch.randint(3, 97, (2, 9)))
    assert len(maps) == 2
    for a in maps:
        assert torch.allclose(a.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert torch.all(a.triu(1) == 0)


def test_head_scores_and_copy_probe_ranges():
    m = tiny_model()
    rows = head_scores(m, 97, half_len=8, batch=2)
    assert len(rows) == 2 * 4
    assert all(0 <= r["previous_token_score"] <= 1 and 0 <= r["induction_score"] <= 1 for r in rows)
    probe = repeated_sequence_loss(m, 97, half_len=8, batch=2)
    assert all(torch.isfinite(torch.tensor(v)) for v in probe.values())


def test_paired_stats():
    s = paired_stats([3.0, 3.1, 3.2, 3.3], [2.9, 3.0, 3.1, 3.25])
    assert s["mean_diff"] == pytest.approx(-0.0875)
    assert s["kvshift_better_in"] == 4
    assert s["p_value_permutation"] == pytest.approx(2 / 16)
    assert 0 < s["p_value_t"] < 0.05
    with pytest.raises(ValueError):
        paired_stats([1.0], [])


def test_model_spec_overrides_config_fields_by_their_own_names():
    from kvshift.experiments.toy_train import ModelSpec, build_model

    spec = ModelSpec("kvshift-1L", 1, True, 16, 2, config={"kv_shift_parametrization": "gate",
                                                            "num_key_value_heads": 1})
    model = build_model(spec, vocab_size=20, max_len=32, seed=0)
    assert model.config.kv_shift_parametrization == "gate" and model.config.num_key_value_heads == 1
    with pytest.raises(ValueError, match="kv_shfit"):
        build_model(ModelSpec("x", 1, True, config={"kv_shfit": True}), vocab_size=20, max_len=32, seed=0)


def test_lr_robustness_tiny_end_to_end(tmp_path):
    """Both workloads, both arms, every LR: the documented files and fields; a huge LR counts as diverged."""
    import json

    from kvshift.data.shards import prepare
    from kvshift.experiments.lr_robustness import run_lr_robustness

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * 3}\n" * 30)
    prepare(str(corpus), tmp_path / "data", vocab_size=300, val_fraction=0.2)
    out = tmp_path / "out"
    payload = run_lr_robustness(seeds=2, out_dir=out, steps=3, data=str(tmp_path / "data"), lrs=[1e-3, 1e4])
    for name in ("results.json", "results.md", "config.json", "lr_robustness.png"):
        assert (out / name).exists(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["workload"], r["model"], r["lr"]) for r in rows} == {
        (w, m, lr) for w in ("lm", "induction") for m in ("vanilla", "kvshift") for lr in (1e-3, 1e4)}
    for r in rows:
        assert r["seeds"] == 2 and 0 <= r["diverged"] <= 2 and {"mean", "std", "nonfinite"} <= set(r)
        assert r["layers"] == (2 if r["workload"] == "lm" else 1)  # the toy workload is the 1-layer one
    huge = [r for r in rows if r["lr"] == 1e4 and r["workload"] == "induction"]
    assert all(r["diverged"] == 2 and r["nonfinite"] == 2 and r["mean"] is None for r in huge)  # lr 1e4 blows up
    kv_small = next(r for r in rows if r["lr"] == 1e-3 and r["workload"] == "lm" and r["model"] == "kvshift")
    assert kv_small["pairs"] == 2 and "p_signflip" in kv_small
    assert len(payload["runs"]) == 2 * 2 * 2 * 2
    assert not list((out / "runs").rglob("model.safetensors"))  # weights are not kept


def test_induction_results_explain_each_kv_seed(tmp_path):
    """results.md / .json list, per seed of the 1-layer KV model, the initial draw (the run's own model before
    training) and the outcome."""
    from kvshift.experiments.toy import run_induction
    from kvshift.experiments.toy_train import ModelSpec, build_model

    payload = run_induction(quick=True, steps=2, seeds=2, out_dir=tmp_path)
    rows = payload["analysis"]["kvshift-1L"]["seeds"]
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        m = build_model(ModelSpec("kvshift-1L", 1, True, 64, 2), 128, 64, r["seed"])
        k, v = m.kv_shift_weights()[0]
        want = [(float(k[h, 0]), float(v[h, 0])) for h in range(2)]
        assert [x for pair in r["initial_alpha1_beta1"] for x in pair] == pytest.approx([x for p in want for x in p])
        assert r["nearest_start"] == pytest.approx(min((a**2 + (1 - b) ** 2) ** 0.5 for a, b in want))
    assert rows[0]["initial_alpha1_beta1"] != rows[1]["initial_alpha1_beta1"]
    assert "## Seeds of kvshift-1L" in (tmp_path / "results.md").read_text()
