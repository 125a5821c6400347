"""The "torch" backend of the KV shift: lean eager PyTorch (custom autograd, in-place accumulation), the default off CUDA.

Same semantics as :func:`kv_shift_ref`, in fewer passes over memory: the forward writes ``w0 * x`` once
and accumulates ``w1 * x_{t-1}`` into it in place; the backward does the mirror image and reduces the
weight gradients with fused dot products. Masked predecessors go through ``torch.where`` (never a
multiply), so NaN/inf in padded rows cannot leak.
"""

from __future__ import annotations

import torch

from .checks import previous_token_keep_mask

__all__ = ["kv_shift_torch", "kv_shift_torch_keep"]


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return t
    return torch.where(keep[..., None, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def _shift_forward(x, weight, prev, keep):
    """``w0 * x`` written once, ``w1 * x_{t-1}`` (and ``w1 * prev`` at t = 0) accumulated in place."""
    H = x.shape[2]
    w0, w1 = weight[:, 0].view(1, 1, H, 1), weight[:, 1].view(1, 1, H, 1)
    y = x * w0
    if x.shape[1] > 1:
        y[:, 1:].addcmul_(_masked(x[:, :-1], None if keep is None else keep[:, 1:]), w1)
    if prev is not None:
        y[:, 0].addcmul_(_masked(prev[:, None], None if keep is None else keep[:, :1])[:, 0], w1[:, 0])
    return y


def _shift_functional(x, weight, prev, keep):
    """The same map out of place, for ``torch.compile``: Dynamo cannot trace the in-place custom autograd
    (``out=`` into strided views), and Inductor fuses this form into one kernel with its own backward."""
    H = x.shape[2]
    w0, w1 = weight[:, 0].view(1, 1, H, 1), weight[:, 1].view(1, 1, H, 1)
    first = prev[:, None] if prev is not None else torch.zeros_like(x[:, :1])
    pred = _masked(torch.cat([first, x[:, :-1]], dim=1), keep)
    return x * w0 + pred * w1


class KVShiftTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, prev, keep):
        ctx.save_for_backward(x, weight, prev, keep)
        return _shift_forward(x, weight, prev, keep)

    @staticmethod
    def backward(ctx, g):
        x, weight, prev, keep = ctx.saved_tensors
        H = x.shape[2]
        w0, w1 = weight[:, 0].view(1, 1, H, 1), weight[:, 1].view(1, 1, H, 1)
        keep_next = None if keep is None else keep[:, 1:]
        gx = gw = gprev = None
        g_next = _masked(g[:, 1:], keep_next)  # gradient reaching x_t through token t+1's shift
        # One [B, T, H, D] buffer serves as scratch for the weight-gradient products, then becomes grad_x:
        # every fresh large allocation costs page faults on CPU, more than the arithmetic itself.
        buf = torch.empty_like(g, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[1]:
            gw0 = torch.mul(g, x, out=buf).sum(-1).sum((0, 1))  # [H]
            gw1 = torch.mul(g_next, x[:, :-1], out=buf[:, 1:]).sum(-1).sum((0, 1))
            if prev is not None:
                g0 = _masked(g[:, :1], None if keep is None else keep[:, :1])[:, 0]
                gw1 = gw1 + torch.linalg.vecdot(g0, prev).sum(dim=0)
            gw = torch.stack([gw0, gw1], dim=-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gx = torch.mul(g, w0, out=buf)
            if x.shape[1] > 1:
                gx[:, :-1].addcmul_(g_next, w1)
        if prev is not None and ctx.needs_input_grad[2]:
            gprev = _masked(g[:, :1], None if keep is None else keep[:, :1])[:, 0] * w1[:, 0]
        return gx, gw, gprev, None


def kv_shift_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    reset_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`kv_shift_ref` semantics (arguments already validated by the dispatcher)."""
    B, T, H, D = x.shape
    keep = previous_token_keep_mask(B, T, x.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                                    has_prev=True, reset_mask=reset_mask)
    return kv_shift_torch_keep(x, weight, prev, keep)


def kv_shift_torch_keep(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor | None,
                        keep: torch.Tensor | None) -> torch.Tensor:
    """:func:`kv_shift_torch` with the boundaries already reduced to a ``[B, T]`` keep mask
    (``previous_token_keep_mask(..., has_prev=True)``; None = keep all): built once per forward."""
    cdt = torch.promote_types(x.dtype, weight.dtype)
    xc, wc, pc = x.to(cdt), weight.to(cdt), None if prev is None else prev.to(cdt)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (prev is not None and prev.requires_grad))
    if torch.compiler.is_compiling():
        return _shift_functional(xc, wc, pc, keep).to(x.dtype)
    if not needs_grad:  # inference (decode steps): no autograd bookkeeping
        return _shift_forward(xc, wc, pc, keep).to(x.dtype)
    # position 0 reads prev (when given) unless a reset or the mask says otherwise; without prev it is 0
    return KVShiftTorchFunction.apply(xc, wc, pc, keep).to(x.dtype)
