"""Training configuration as dataclasses, and `--set a.b=value` overrides with type checking."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OPTIM_IMPLEMENTATIONS", "TRAINABLE", "SHIFT_INITS", "ATTN_IMPLEMENTATIONS", "ModelConfig", "DataConfig", "OptimConfig", "DistributedConfig", "TrainConfig",
           "apply_overrides", "config_to_dict", "config_from_dict"]


@dataclass
class ModelConfig:
    """Overrides of :class:`kvshift.KVShiftConfig` fields (same names, passed through as they are);
    ``vocab_size`` 0 means: take it from the data."""

    vocab_size: int = 0
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    kv_shift: bool = True
    # paper | identity | softmax | near-identity, or auto: paper from scratch; with init_from the
    # checkpoint's own shift weights where it has them, identity where it has none
    kv_shift_init: str = "paper"
    kv_shift_position: str = "pre_rope"
    kv_shift_parametrization: str = "free"
    # the lab's variants (see KVShiftConfig and TOKEN_MIXING_VARIANTS)
    kv_shift_targets: str = "kv"
    kv_shift_window: int = 2
    kv_shift_granularity: str = "head"
    kv_shift_residual: bool = False
    token_smear: bool = False
    # auto: flex_attention on CUDA (block-sparse document masks for packed rows), sdpa on CPU; or any of
    # ATTN_IMPLEMENTATIONS (flex_attention trains on CUDA only: no backward on CPU)
    attn_implementation: str = "auto"
    # Start from a pretrained checkpoint: a kvshift model folder, a Llama / Qwen2 / Qwen3 / Mistral folder
    # or hub id, or a GGUF file (converted on the fly); its architecture replaces the fields above
    init_from: str = ""


@dataclass
class DataConfig:
    """``source``: ``"prepared"`` (a ``kvshift data prepare`` folder at ``path``) or ``"stdlib-bytes"``
    (raw bytes of a few standard-library modules; needs no preparation)."""

    source: str = "prepared"
    path: str = "data/stdlib"
    seq_len: int = 256
    batch_size: int = 16  # rows per process per micro-step
    grad_accum: int = 1
    # Validation: 0 = the whole val split (every document, every token once); N = a fixed seeded sample
    # of about N tokens drawn from every val document. val_curve_tokens sizes the evaluations during
    # training (0 = the same as val_tokens); the final evaluation always uses val_tokens.
    val_tokens: int = 0
    val_curve_tokens: int = 0
    val_batch_size: int = 16
    # deprecated: N > 0 sets val_tokens to N x val_batch_size x seq_len (a sample from every document,
    # no longer the first N batches of the split)
    val_batches: int = 0
    byte_files: int = 60


OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "loop")
TRAINABLE = ("all", "shift", "lora", "shift-current")
SHIFT_INITS = ("auto", "paper", "identity", "softmax", "near-identity")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    shift_lr_mult: float = 1.0  # LR multiplier of the k_shift / v_shift scalars
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_frac: float = 0.2  # WSD: fraction of steps spent decaying
    implementation: str = "auto"  # auto (fused unless FSDP-sharded) | fused | foreach | loop
    # What trains: all | shift (only the shift scalars; every other weight frozen) | lora (PEFT LoRA of
    # rank lora_rank on the attention and MLP projections, plus the shift scalars; saved merged) |
    # shift-current (a control: only the current-token shift weights, the previous-token ones held at 0)
    trainable: str = "all"
    lora_rank: int = 8
    lora_alpha: float = 0.0  # 0: 2 x lora_rank


@dataclass
class DistributedConfig:
    strategy: str = "none"  # none | ddp | fsdp (FSDP2, torch.distributed.fsdp.fully_shard)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    threads: int = 0  # torch.set_num_threads on CPU; 0 leaves the default
    eval_every: int = 100
    log_every: int = 10
    # Checkpoint every N steps and at the end (0: only at the end); the newest keep_checkpoints are kept.
    # SIGINT (Ctrl-C) / SIGTERM also save one after the current step, then stop with exit code 130.
    ckpt_every: int = 100
    stop_after: int = 0  # stop (checkpointed, resumable) after this many steps of this run; 0: run to the end
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        choices = {
            "data.source": (self.data.source, ("prepared", "stdlib-bytes")),
            "optim.schedule": (self.optim.schedule, ("cosine", "wsd", "constant")),
            "optim.implementation": (self.optim.implementation, OPTIM_IMPLEMENTATIONS),
            "model.attn_implementation": (self.model.attn_implementation, ATTN_IMPLEMENTATIONS),
            "distributed.strategy": (self.distributed.strategy, ("none", "ddp", "fsdp")),
            "device": (self.device, ("auto", "cpu", "cuda")),
            "dtype": (self.dtype, ("auto", "float32", "bfloat16")),
            "optim.trainable": (self.optim.trainable, TRAINABLE),
            "model.kv_shift_init": (self.model.kv_shift_init, SHIFT_INITS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        for key in ("steps", "data.seq_len", "data.batch_size", "data.grad_accum", "log_every", "eval_every"):
            obj, name = _resolve(self, key)
            if getattr(obj, name) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(obj, name)}")
        if not 0 <= self.optim.decay_frac <= 1:
            raise ValueError(f"optim.decay_frac must be in [0, 1], got {self.optim.decay_frac}")
        for key in ("data.val_tokens", "data.val_curve_tokens", "data.val_batches"):
            obj, name = _resolve(self, key)
            if getattr(obj, name) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = the whole val split), got {getattr(obj, name)}")
        for key in ("ckpt_every", "stop_after", "keep_checkpoints", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.data.val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1, got {self.data.val_batch_size}")
        self._validate_trainable()

    def _validate_trainable(self) -> None:
        if self.optim.trainable in ("shift", "shift-current") and not self.model.kv_shift \
                and not self.model.token_smear:
            raise ValueError(f"optim.trainable={self.optim.trainable} with model.kv_shift=false: nothing would train (turn the shift "
                             "on, or train optim.trainable=all)")
        if self.optim.trainable == "lora":
            if self.optim.lora_rank < 1:
                raise ValueError(f"optim.lora_rank must be >= 1, got {self.optim.lora_rank}")
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("optim.trainable=lora needs the peft package: pip install 'kvshift[lora]' "
                                 "(or pip install peft)")
            if self.distributed.strategy == "fsdp":
                raise ValueError("optim.trainable=lora runs under distributed.strategy=ddp or none, not fsdp")

    def validation_budget(self, final: bool = True) -> int:
        """Tokens of one validation pass (0 = the whole val split); see the DataConfig fields."""
        d = self.data
        full = d.val_tokens or (d.val_batches * d.val_batch_size * d.seq_len)
        return full if final or not d.val_curve_tokens else d.val_curve_tokens


def _resolve(cfg: Any, dotted: str) -> tuple[Any, str]:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parts[:i + 1])!r} does not exist")
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if parts[-1] not in names:
        raise ValueError(f"unknown config key {dotted!r}; valid keys here: {sorted(names)}")
    if dataclasses.is_dataclass(getattr(obj, parts[-1])):
        raise ValueError(f"config key {dotted!r} is a section; set one of its fields")
    return obj, parts[-1]


def _parse(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for t in typing.get_args(typ):
            try:
                return _parse(raw, t, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}={raw!r}: {'; '.join(errors)}")
    if typ is type(None):
        if raw.lower() in ("none", "null"):
            return None
        raise ValueError(f"{key} expects None, got {raw!r}")
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects a bool (true/false), got {raw!r}")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key} expects an int, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key} expects a float, got {raw!r}") from None
    if typ is str:
        return raw
    return json.loads(raw)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``["a.b=value", ...]`` in place; unknown keys and values of the wrong type raise ValueError."""
    hints_cache: dict[type, dict] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        obj, name = _resolve(cfg, key.strip())
        hints = hints_cache.setdefault(type(obj), typing.get_type_hints(type(obj)))
        setattr(obj, name, _parse(raw.strip(), hints[name], key.strip()))
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig()
    for section in ("model", "data", "optim", "distributed"):
        setattr(cfg, section, type(getattr(cfg, section))(**d.get(section, {})))
    for k, v in d.items():
        if k not in ("model", "data", "optim", "distributed"):
            setattr(cfg, k, v)
    return cfg
