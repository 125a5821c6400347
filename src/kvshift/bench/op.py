"""Op-level benchmark: forward+backward of causal attention with and without the KV shift (ours and peers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops.kv_shift import kv_shift, kv_shift_rope
from .common import time_fn
from .peers import kv_shift_pad_slice, kv_shift_unfold

__all__ = ["bench_op", "columns", "GPU_SHAPES", "CPU_SHAPES"]

# (B, H, T, D)
GPU_SHAPES: list[tuple[int, int, int, int]] = [(4, 16, 4096, 128), (16, 12, 1024, 64), (1, 32, 16384, 128)]
CPU_SHAPES: list[tuple[int, int, int, int]] = [(2, 4, 256, 64), (1, 8, 512, 32)]

ShiftFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa_layout(shift: ShiftFn) -> ShiftFn:
    return lambda x, w: shift(x, w).transpose(1, 2)


# name -> shift applied to K and V [B, T, H, D], returning attention's [B, H, T, D] (None: attention alone).
# "shift_fused" (CUDA only) is the model's path: one Triton pass that shifts and writes the SDPA layout.
VARIANTS: dict[str, ShiftFn | None] = {
    "attn": None,
    "shift": _sdpa_layout(lambda x, w: kv_shift(x, w, backend="auto")),
    "shift_fused": lambda x, w: kv_shift_rope(x, w, backend="auto"),
    "unfold": _sdpa_layout(kv_shift_unfold),
    "pad_slice": _sdpa_layout(kv_shift_pad_slice),
}
CUDA_ONLY = ("shift_fused",)


def _make_step(
    shift: ShiftFn | None, B: int, H: int, T: int, D: int, dtype: torch.dtype, device: torch.device
) -> Callable[[], None]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    # Projections produce [B, T, H, D]; the shift works there, attention sees [B, H, T, D] views.
    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    wk, wv = rand(H, 2), rand(H, 2)
    grad_out = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    leaves = [q, k, v] + ([wk, wv] if shift is not None else [])

    def step() -> None:
        kk, vv = (k.transpose(1, 2), v.transpose(1, 2)) if shift is None else (shift(k, wk), shift(v, wv))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True)
        torch.autograd.grad(out, leaves, grad_out)

    return step


def bench_op(
    shapes: list[tuple[int, int, int, int]] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    warmup: int | None = None,
    iters: int | None = None,
) -> list[dict]:
    """Time forward+backward of attention alone and of shift(K), shift(V) + attention, per shape.

    Variants: ``attn`` (SDPA, causal), ``shift`` (``kv_shift`` with the auto backend: Triton on CUDA,
    eager PyTorch elsewhere, then a transposed view), ``shift_fused`` (CUDA only: ``kv_shift_rope``, shift
    and layout change in one kernel), and the peers ``unfold`` and ``pad_slice`` (:mod:`kvshift.bench.peers`).
    Shift weights use the activations' dtype so that every variant feeds SDPA the same dtype.

    Args:
        shapes: ``(B, H, T, D)`` tuples; default :data:`GPU_SHAPES` on CUDA, :data:`CPU_SHAPES` otherwise.
        dtype: default bf16 on CUDA, fp32 otherwise.
        device: default CUDA when available.
        warmup, iters: default 10 / 50 on CUDA, 3 / 15 otherwise.

    Returns:
        One dict per shape: the shape, ``<variant>_ms`` (median) and ``<variant>_ratio`` (vs ``attn``).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    shapes = shapes if shapes is not None else (GPU_SHAPES if on_cuda else CPU_SHAPES)
    dtype = dtype if dtype is not None else (torch.bfloat16 if on_cuda else torch.float32)
    warmup = warmup if warmup is not None else (10 if on_cuda else 3)
    iters = iters if iters is not None else (50 if on_cuda else 15)

    variants = {n: f for n, f in VARIANTS.items() if on_cuda or n not in CUDA_ONLY}
    rows = []
    for B, H, T, D in shapes:
        row: dict = {
            "B": B,
            "H": H,
            "T": T,
            "D": D,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
        }
        for name, shift in variants.items():
            step = _make_step(shift, B, H, T, D, dtype, device)
            row[f"{name}_ms"] = time_fn(step, warmup, iters, device)
            del step
            if on_cuda:
                torch.cuda.empty_cache()
        for name in variants:
            row[f"{name}_ratio"] = row[f"{name}_ms"] / row["attn_ms"]
        rows.append(row)
    return rows


def columns(rows: list[dict]) -> list[str]:
    """Table columns for the variants present in ``rows``."""
    names = [n for n in VARIANTS if f"{n}_ms" in rows[0]]
    return ["B", "H", "T", "D", "dtype"] + [f"{n}_ms" for n in names] + [f"{n}_ratio" for n in names if n != "attn"]
