"""A small, readable trainer for the synthetic tasks: fixed steps, AdamW, warm-up, periodic evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..models import KVShiftConfig, KVShiftForCausalLM
from ..train.config import OptimConfig
from ..train.optim import build_optimizer, lr_factor

__all__ = ["ModelSpec", "RunSpec", "build_model", "train_on_task", "steps_to_reach"]


@dataclass
class ModelSpec:
    """One model of an experiment: depth, width and whether its attention shifts K/V, in the short names
    the experiment tables use; ``config`` overrides any other :class:`KVShiftConfig` field by its own name
    (the config owns the model fields; this spec only names the ones every experiment varies)."""

    name: str
    layers: int
    kv_shift: bool
    hidden_size: int = 64
    num_heads: int = 2
    intermediate_size: int | None = None  # None: 4 * hidden (0: no MLP width pressure change)
    kv_shift_init: str = "paper"
    config: dict = field(default_factory=dict)


@dataclass
class RunSpec:
    """Optimisation settings shared by every model of an experiment."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_every: int = 50
    curve_eval_size: int = 250  # sequences per point of the learning curve (the final point uses all)
    grad_clip: float = 1.0
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def build_model(spec: ModelSpec, vocab_size: int, max_len: int, seed: int) -> KVShiftForCausalLM:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size if spec.intermediate_size is not None else 4 * spec.hidden_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=max_len, rope_theta=10000.0, kv_shift=spec.kv_shift,
        kv_shift_init=spec.kv_shift_init, use_cache=False, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    unknown = sorted(set(spec.config) - set(KVShiftConfig().to_dict()) - set(fields))
    if unknown:
        raise ValueError(f"ModelSpec {spec.name!r}: config sets unknown KVShiftConfig field(s) {unknown}")
    return KVShiftForCausalLM(KVShiftConfig(**{**fields, **spec.config}))


def _loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, batch, metric: Callable, chunk: int = 250) -> float:
    """``metric(logits, batch)`` averaged over ``batch`` in chunks (weights by chunk size)."""
    model.eval()
    n = batch["input_ids"].shape[0]
    total = 0.0
    for s in range(0, n, chunk):
        part = {k: v[s:s + chunk] for k, v in batch.items()}
        total += metric(model(part["input_ids"]).logits, part) * part["input_ids"].shape[0]
    model.train()
    return total / n


def train_on_task(
    task,
    spec: ModelSpec,
    run: RunSpec,
    metric: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], float],
    *,
    seed: int,
    eval_batch: Mapping[str, torch.Tensor],
    progress=None,
) -> dict:
    """Train ``spec`` on ``task.sample`` batches; returns the metric curve and the learned shift weights.

    Data order depends only on ``seed`` (so every model sees the same batches for the same seed), and the
    model initialisation on ``seed`` too.
    """
    if run.threads:
        torch.set_num_threads(run.threads)
    model = build_model(spec, task.vocab_size, eval_batch["input_ids"].shape[1], seed)
    initial = {str(i): [w[0].tolist(), w[1].tolist()] for i, w in model.kv_shift_weights().items()}
    model.train()
    # the language-model trainer's AdamW groups and schedule: linear warm-up, then constant; the
    # per-parameter loop implementation (PyTorch's CPU default), so the toy results are unchanged
    optim_cfg = OptimConfig(lr=run.lr, weight_decay=run.weight_decay, beta1=0.9, beta2=0.95,
                            warmup_steps=run.warmup_steps, schedule="constant", implementation="loop")
    opt = build_optimizer(model, optim_cfg)
    data_gen = torch.Generator().manual_seed(10_000 + seed)
    n_curve = min(run.curve_eval_size, eval_batch["input_ids"].shape[0])
    curve_batch = {k: v[:n_curve] for k, v in eval_batch.items()}
    curve: list[tuple[int, float]] = [(0, evaluate(model, curve_batch, metric))]
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, run.steps + 1):
        for g in opt.param_groups:
            g["lr"] = optim_cfg.lr * g["lr_mult"] * lr_factor(step - 1, run.steps, optim_cfg)
        batch = task.sample(run.batch_size, data_gen)
        loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step == run.steps:
            curve.append((step, evaluate(model, eval_batch, metric)))
        elif step % run.eval_every == 0:
            curve.append((step, evaluate(model, curve_batch, metric)))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(model=spec.name, seed=seed, loss=f"{losses[-1]:.3f}", metric=f"{curve[-1][1]:.3f}",
                                 refresh=False)
    return {
        "model": spec.name, "spec": asdict(spec), "seed": seed, "lr": run.lr, "curve": curve,
        "final": curve[-1][1], "loss_curve": losses[:: max(1, len(losses) // 200)],
        "seconds": time.perf_counter() - t0, "diverged": not all(math.isfinite(v) for v in losses),
        "shift_weights": {str(i): [w[0].tolist(), w[1].tolist()] for i, w in model.kv_shift_weights().items()},
        "initial_shift_weights": initial,  # {layer: [k [Hkv, 2], v [Hkv, 2]]}, (current, previous) per head
        "model_obj": model,
    }


def steps_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """First evaluated step whose metric is >= ``threshold`` (None if never)."""
    for step, value in curve:
        if value >= threshold:
            return step
    return None
