"""`kvshift reproduce retrofit` end to end on a tiny corpus, and its from-scratch reference pairing."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from kvshift.data.shards import prepare
from kvshift.experiments.retrofit import CONTROL, RETROFIT_ARMS, SCRATCH, run_retrofit, scratch_reference


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrofit-exp")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(20):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)))
    prepare(str(corpus), root / "data", vocab_size=300, val_fraction=0.2)
    out = root / "out"
    payload = run_retrofit(quick=True, out_dir=out, seeds=1, steps=3, data=str(root / "data"), workers=1)
    return out, payload


def test_every_arm_runs_from_one_pretrained_checkpoint(result):
    out, payload = result
    names = [a.name for a in RETROFIT_ARMS]
    assert set(payload["paired"]) == {*names, SCRATCH} - {CONTROL}
    for f in ("results.json", "results.md", "config.json", "retrofit.png"):
        assert (out / f).is_file()
    pre = load_file(str(out / "runs" / "pretrain-seed0" / "final" / "model.safetensors"))
    only = load_file(str(out / "runs" / "kv-shift-only-seed0" / "final" / "model.safetensors"))
    assert all(torch.equal(pre[k], only[k]) for k in pre)  # shift-only: every pretrained weight untouched
    assert sorted(set(only) - set(pre)) == sorted(f"model.layers.{i}.self_attn.{n}" for i in (0, 1)
                                                  for n in ("k_shift", "v_shift"))


def test_arms_share_the_data_order_and_the_identity_start(result):
    out, _ = result

    def first_loss(arm):
        rows = [json.loads(x) for x in (out / "runs" / f"{arm}-seed0" / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if "loss" in r)

    van, kv = first_loss(CONTROL), first_loss("kv-identity")
    assert van["step"] == kv["step"] == 1
    assert abs(van["loss"] - kv["loss"]) <= 1e-5


def test_shift_movement_is_reported_per_layer_and_head(result):
    _, payload = result
    movement = {arm: per.get("0", per.get(0)) for arm, per in payload["shift_movement"].items()}  # JSON keys
    for arm in ("kv-identity", "kv-identity-lr100", "kv-near-identity"):
        rows = movement[arm]
        assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    start = movement["kv-near-identity"][0]["start"]
    assert start == pytest.approx([0.9, 0.1, 0.9, 0.1])
    big = max(r["max_move"] for r in movement["kv-identity-lr100"])
    small = max(r["max_move"] for r in movement["kv-identity"])
    assert big > small > 0  # the x100 shift LR moves the weights further


def test_scratch_reference_pairs_only_the_same_vanilla_runs(tmp_path):
    runs = {"pretrained": {0: {"val_loss": 4.0}, 1: {"val_loss": 4.5}, 2: {"val_loss": 5.0}}}
    saved = {"runs": {"vanilla": [{"seed": 0, "val_loss": 4.0}, {"seed": 1, "val_loss": 4.6},
                                  {"seed": 2, "val_loss": 5.0}],
                      "kvshift": [{"seed": 0, "val_loss": 3.9}, {"seed": 1, "val_loss": 4.0},
                                  {"seed": 2, "val_loss": 4.8}]}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    ref = scratch_reference(runs, tmp_path)
    assert ref["seeds"] == [0, 2]  # seed 1's vanilla run is not this pretraining run
    assert ref["diff"] == pytest.approx(-0.15)
    assert scratch_reference(runs, tmp_path / "missing") is None
