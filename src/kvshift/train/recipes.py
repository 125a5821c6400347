"""Recipes: functions returning a complete `TrainConfig` (override any field with `--set a.b=value`)."""

from __future__ import annotations

from collections.abc import Callable

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = ["RECIPES", "get_recipe"]


def tiny() -> TrainConfig:
    """A few seconds on CPU, no prepared data: raw bytes of a few stdlib modules, a 2-layer model."""
    return TrainConfig(
        name="tiny",
        model=ModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2),
        data=DataConfig(source="stdlib-bytes", seq_len=64, batch_size=8, val_curve_tokens=1024, val_batch_size=8,
                        byte_files=20),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.1),
        steps=20, eval_every=10, log_every=5, ckpt_every=10,
    )


def stdlib_small() -> TrainConfig:
    """`kvshift compare` default, sized for <= 30 min on 2 CPU cores for 3 arms x 6 seeds: 2 layers, d 128,
    400 steps of 8 x 128 tokens (0.41M tokens per run) on the prepared stdlib corpus (BPE 8192), the final
    evaluation on the whole val split. The budget goes to tokens and seeds, not width: on this corpus the
    picture changes with training length, and a paired claim needs >= 6 seeds."""
    return TrainConfig(
        name="stdlib-small",
        model=ModelConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, tie_word_embeddings=True),
        data=DataConfig(source="prepared", path="data/stdlib", seq_len=128, batch_size=8, val_batch_size=16,
                        val_tokens=0, val_curve_tokens=16384),
        optim=OptimConfig(lr=3e-3, warmup_steps=25, weight_decay=0.1, schedule="cosine"),
        steps=400, eval_every=40, log_every=10, ckpt_every=100,
    )


def stdlib_quick() -> TrainConfig:
    """`kvshift compare --quick` (<= 6 min on 2 CPU cores for 2 arms x 6 seeds): the same model, 160 steps,
    validated on a fixed sample of 48k tokens drawn from every val document."""
    cfg = stdlib_small()
    cfg.name = "stdlib-quick"
    cfg.data.val_tokens, cfg.data.val_curve_tokens = 49152, 8192
    cfg.optim.warmup_steps = 20
    cfg.steps, cfg.eval_every, cfg.ckpt_every = 160, 20, 40  # a val curve of 8 points
    return cfg


def retrofit() -> TrainConfig:
    """The default with ``--init-from`` (a pretrained checkpoint of ~100M parameters on a CPU, or larger on a
    GPU): the model is the checkpoint's, so only data and optimisation are set here. AdamW lr 1e-4 for the
    pretrained weights and x100 (1e-2) for the shift scalars, which start at the identity and have far to go;
    rows of 256 tokens, validation on a fixed sample of about 8k val tokens from every document."""
    return TrainConfig(
        name="retrofit",
        model=ModelConfig(kv_shift=True, kv_shift_init="auto"),
        data=DataConfig(source="prepared", path="data/stdlib", seq_len=256, batch_size=4, val_batch_size=4,
                        val_tokens=8192, val_curve_tokens=4096),
        optim=OptimConfig(lr=1e-4, shift_lr_mult=100.0, warmup_steps=3, weight_decay=0.1, schedule="cosine"),
        steps=20, eval_every=10, log_every=1, ckpt_every=10, keep_checkpoints=1,
    )


def gpt2_small() -> TrainConfig:
    """GPT-2-small-class model (12 layers, d 768, 12 heads, T 1024) for a GPU; bring your own data."""
    return TrainConfig(
        name="gpt2-small",
        model=ModelConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12, tie_word_embeddings=True),
        data=DataConfig(source="prepared", path="data/fineweb-edu", seq_len=1024, batch_size=32, grad_accum=1,
                        val_tokens=4_000_000, val_curve_tokens=500_000, val_batch_size=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=250, weight_decay=0.1, schedule="wsd", decay_frac=0.4),
        steps=5000, eval_every=250, log_every=10, compile=True, ckpt_every=500,
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny, "stdlib-small": stdlib_small, "stdlib-quick": stdlib_quick, "gpt2-small": gpt2_small,
    "retrofit": retrofit,
}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return RECIPES[name]()
