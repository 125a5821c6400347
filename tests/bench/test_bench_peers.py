"""The benchmark's peer KV-shift formulations equal the reference; the op bench and table helpers run."""

import pytest
import torch

from kvshift.bench.common import time_fn
from kvshift.bench.op import bench_op
from kvshift.bench.peers import kv_shift_pad_slice, kv_shift_unfold
from kvshift.ops.kv_shift.reference import kv_shift_ref
from kvshift.report import markdown_table


@pytest.mark.parametrize("peer", [kv_shift_unfold, kv_shift_pad_slice])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 1, 2, 4), (3, 17, 1, 16)])
def test_peer_equals_reference(peer, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(shape[2], 2, generator=g, requires_grad=True)
    y, y_ref = peer(x, w), kv_shift_ref(x, w)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, w], gy), torch.autograd.grad(y_ref, [x, w], gy), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_markdown_table():
    table = markdown_table([{"a": 1, "b": 0.12345}, {"a": 2}], ["a", "b"], digits=3)
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| 2 |  |"]


def test_time_fn_and_bench_op_smoke():
    assert time_fn(lambda: None, warmup=1, iters=3, device="cpu") >= 0.0
    rows = bench_op(shapes=[(1, 2, 8, 4)], dtype=torch.float32, device="cpu", warmup=0, iters=1)
    assert len(rows) == 1 and rows[0]["attn_ratio"] == 1.0
    for name in ("shift", "unfold", "pad_slice"):
        assert rows[0][f"{name}_ms"] > 0.0
