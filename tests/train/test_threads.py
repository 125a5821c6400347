"""Recipes leave the thread count to the environment (OMP_NUM_THREADS) unless `--set threads=N` is given."""

from __future__ import annotations

import pytest
import torch

from kvshift.train.config import apply_overrides
from kvshift.train.loop import train
from kvshift.train.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_do_not_pin_threads(name):
    assert get_recipe(name).threads == 0


@pytest.mark.parametrize("threads,expected", [(0, []), (1, [1])])
def test_train_sets_threads_only_when_asked(tmp_path, monkeypatch, threads, expected):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    cfg = apply_overrides(get_recipe("tiny"), ["steps=1", "eval_every=1", "model.hidden_size=32",
                                                "model.intermediate_size=64", "data.seq_len=16",
                                                "data.byte_files=4", "tensorboard=false", "progress=false",
                                                f"threads={threads}"])
    train(cfg, tmp_path / "run")
    assert calls == expected
