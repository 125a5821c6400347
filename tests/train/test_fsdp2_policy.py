"""FSDP2 communicates bf16 parameters and fp32 gradients in a bf16 run, and skips the gradient reduce-scatter on
every accumulation micro-step but the last (issue 28 item 6)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kvshift.train.config import TrainConfig
from kvshift.train.distributed import fsdp_mixed_precision, gradient_sync


@pytest.mark.parametrize("dtype,device,bf16", [("bfloat16", "cpu", True), ("auto", "cuda", True),
                                               ("auto", "cpu", False), ("float32", "cuda", False)])
def test_mixed_precision_policy_follows_the_run_dtype(dtype, device, bf16):
    cfg = TrainConfig()
    cfg.dtype = dtype
    mp = fsdp_mixed_precision(cfg, torch.device(device))
    if not bf16:
        assert mp is None
    else:
        assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)


class _FSDP2Like(torch.nn.Module):
    """What FSDP2's fully_shard adds to a module: set_requires_gradient_sync, and no no_sync."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.calls.append(flag)


class _DDPLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


def test_fsdp2_micro_steps_skip_the_reduce_scatter():
    m = _FSDP2Like()
    for i in range(3):  # three micro-steps: sync off, off, then on for the last
        with gradient_sync(m, i == 2):
            pass
    assert m.calls == [False, True, False, True]  # off for each of the first two, restored after each


def test_ddp_uses_no_sync_and_plain_models_nothing():
    d = _DDPLike()
    with gradient_sync(d, False):
        pass
    with gradient_sync(d, True):
        pass
    assert d.entered == 1
    with gradient_sync(torch.nn.Linear(2, 2), False):
        pass
