"""Peer formulations of the 2-tap KV shift seen in public code, kept only as benchmark baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kv_shift_unfold", "kv_shift_pad_slice"]


def kv_shift_unfold(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The paper appendix's causal depthwise convolution, written from its description.

    Front-pads one zero row over time, unfolds windows of 2 over time and multiplies by the per-head
    kernel ``[w_prev, w_cur]``. Materialises a ``[B, T, H, D, 2]`` tensor. No masks, no carried state.

    Args:
        x: ``[B, T, H, D]``.
        weight: ``[H, 2]`` = (current, previous), as in :func:`kvshift.ops.kv_shift.kv_shift`.
    """
    H = x.shape[2]
    padded = F.pad(x, (0, 0, 0, 0, 1, 0))  # [B, T+1, H, D], zero row in front
    windows = padded.unfold(1, 2, 1)  # [B, T, H, D, 2]: (x_{t-1}, x_t)
    kernel = weight.flip(-1).view(1, 1, H, 1, 2)  # [w_prev, w_cur]
    return (windows * kernel).sum(-1)


def kv_shift_pad_slice(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Slice-and-pad formulation: ``w_cur * x + w_prev * pad(x[:, :-1])``. No masks, no carried state.

    Args:
        x: ``[B, T, H, D]``.
        weight: ``[H, 2]`` = (current, previous).
    """
    H = x.shape[2]
    w_cur = weight[:, 0].view(1, 1, H, 1)
    w_prev = weight[:, 1].view(1, 1, H, 1)
    return w_cur * x + w_prev * F.pad(x[:, :-1], (0, 0, 0, 0, 1, 0))
