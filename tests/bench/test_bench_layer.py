"""`kvshift bench layer` times the attention the model runs (SDPA, and FlexAttention in a row of its own), not
kvshift's eager attention (issue 28 item 5)."""

from __future__ import annotations

import torch

import kvshift.layers.attention as attention_layer
from kvshift.bench.model import TINY_MODEL, bench_layer


def test_bench_layer_rows_are_sdpa_and_flex(monkeypatch):
    used = []
    real = attention_layer.attention_backend

    def lookup(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(attention_layer, "attention_backend", lookup)
    rows = bench_layer(TINY_MODEL, torch.device("cpu"), torch.float32, warmup=0, rounds=1)
    assert [r["attn"] for r in rows] == ["sdpa", "flex_attention"]
    assert set(used) == {"sdpa", "flex_attention"}
    assert [r["pass"] for r in rows] == ["fwd+bwd", "fwd"]  # FlexAttention has no CPU backward
    for r in rows:
        assert r["vanilla_ms"] > 0 and r["kvshift_ms"] > 0
        assert r["ratio"] == r["kvshift_ms"] / r["vanilla_ms"]
