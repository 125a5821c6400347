"""The benchmark timer (tables and the hardware record come from :mod:`kvshift.report`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["time_fn"]


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device | str) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``iters`` runs, after ``warmup`` runs.

    On CUDA each run is timed with CUDA events (synchronised); elsewhere with ``time.perf_counter``.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
