"""AdamW parameter groups (no decay on norms, biases and shift scalars; shift LR multiplier) and LR schedules."""

from __future__ import annotations

import math

import torch

from ..layers.attention import is_shift_parameter
from .config import OPTIM_IMPLEMENTATIONS, OptimConfig

__all__ = ["param_groups", "optimizer_param_groups", "build_optimizer", "lr_factor"]


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three explicit groups: ``decay`` (matrices and embeddings), ``no_decay`` (norms, biases) and
    ``kv_shift`` (the ``k_shift``/``v_shift`` scalars: no decay, LR x ``shift_lr_mult``, kept in fp32)."""
    decay, no_decay, shift = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_shift_parameter(name):
            if p.dtype != torch.float32:
                raise ValueError(f"{name} must be kept in float32, got {p.dtype}")
            shift.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        {"params": shift, "weight_decay": 0.0, "lr_mult": cfg.shift_lr_mult, "name": "kv_shift"},
    ]
    return [g for g in groups if g["params"]]


def optimizer_param_groups(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                           shift_lr_mult: float = 1.0) -> list[dict]:
    """kvshift's AdamW parameter groups for any trainer: ``decay`` (matrices and embeddings, ``weight_decay``),
    ``no_decay`` (norms and biases) and ``kv_shift`` (the shift scalars: no decay, LR ``lr * shift_lr_mult``).
    Frozen parameters (``requires_grad=False``) are left out. Each group carries its ``lr``, so a scheduler
    that scales every group (Hugging Face ``Trainer``'s, ``torch.optim.lr_scheduler``) keeps the ratio::

        groups = kvshift.optimizer_param_groups(model, lr=1e-4, weight_decay=0.1, shift_lr_mult=10)
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(torch.optim.AdamW(groups), None))

    Hugging Face ``Trainer``'s own optimizer would decay every shift weight (pulling the identity (1, 0)
    towards 0); this keeps them undecayed. Raises ``ValueError`` for a bad ``lr`` / ``weight_decay`` /
    ``shift_lr_mult`` or a shift weight that is not fp32."""
    for name, value in (("lr", lr), ("shift_lr_mult", shift_lr_mult)):
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    cfg = OptimConfig(lr=lr, weight_decay=weight_decay, shift_lr_mult=shift_lr_mult)
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return groups


def _implementation_kwargs(params: list[torch.Tensor], implementation: str) -> dict:
    """AdamW's ``fused`` / ``foreach`` flags. ``auto`` is the fused kernel (one pass over every parameter,
    CPU and CUDA) unless a parameter is a sharded DTensor (FSDP2), where PyTorch's own default is kept."""
    if implementation not in OPTIM_IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation must be one of {OPTIM_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        from torch.distributed.tensor import DTensor

        plain = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for p in params)
        return {"fused": True} if plain else {}
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **_implementation_kwargs(params, cfg.implementation))


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up, then constant, cosine or WSD decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(cfg.decay_frac * total)))  # WSD: stable, then linear decay to the floor
    start = total - decay_steps
    if step < start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - start + 1) / decay_steps)
