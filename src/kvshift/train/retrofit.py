"""Training from a pretrained checkpoint (`model.init_from`): the start model, its tokenizer, what may train.

``model.init_from`` is a kvshift model folder or anything ``kvshift convert`` reads (a Llama / Qwen2 /
Qwen3 / Mistral folder or hub id, or a GGUF file), converted on the fly. The architecture is the
checkpoint's: a ``model.*`` override that would change it is refused, naming the field. The shift is added
(``model.kv_shift=true``, identity init unless ``model.kv_shift_init`` says otherwise) or left out
(``model.kv_shift=false``: the control arm, the same model without the shift). ``optim.trainable`` picks
what trains: ``all``, ``shift`` (only the shift scalars; every other weight frozen) or ``lora`` (PEFT LoRA on
the attention and MLP projections, plus the shift scalars; the final model is saved merged).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from ..layers.attention import init_conv_weight, is_shift_parameter
from .config import ModelConfig, TrainConfig

__all__ = ["checkpoint_config", "init_from_checkpoint", "check_model_fields", "load_start_model",
           "source_tokenizer", "check_data_tokenizer", "apply_trainable", "LORA_TARGETS", "ARCHITECTURE_FIELDS"]

# ModelConfig fields that the checkpoint decides (its architecture); kv_shift, kv_shift_init,
# kv_shift_parametrization and attn_implementation stay the run's to choose
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "tie_word_embeddings", "rope_theta", "rms_norm_eps",
                       "kv_shift_position", "kv_shift_targets", "kv_shift_window", "kv_shift_granularity",
                       "kv_shift_residual", "token_smear")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_kvshift_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "kvshift"
    except (OSError, ValueError):
        return False


def _local(init_from: str) -> Path | None:
    from ..paths import check_local_path

    return check_local_path(init_from, "--init-from")


def checkpoint_config(init_from: str):
    """The :class:`KVShiftConfig` of the checkpoint ``init_from`` (no weights read): its own for a kvshift
    folder, else the converted architecture. Raises ``FileNotFoundError`` / ``ValueError`` in one line."""
    from ..models import KVShiftConfig
    from ..models.convert import _check_architecture, kvshift_config_from
    from ..models.gguf import check_gguf, is_gguf, load_gguf_config

    if not init_from:
        raise ValueError("model.init_from is empty")
    if is_gguf(init_from):
        check_gguf(init_from)
        return kvshift_config_from(load_gguf_config(init_from), "identity")
    local = _local(init_from)
    if local is not None:
        if local.is_dir() and (local / "trainer_state.json").is_file():
            raise ValueError(f"--init-from {init_from} is a training checkpoint: continue that run with "
                             f"`kvshift train --resume {init_from}`, or start from its run's final/ folder")
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ValueError(f"--init-from {init_from} is not a model folder (no config.json) nor a .gguf file")
        if _is_kvshift_folder(local):
            return KVShiftConfig.from_pretrained(local)
    from ..models.baichuan_m1 import is_baichuan_m1, kvshift_config_from_baichuan_m1, source_config

    raw = source_config(init_from)
    if is_baichuan_m1(raw):  # a KV-shift model of its own (folder or hub id), read from its files: no remote code
        return kvshift_config_from_baichuan_m1(raw)
    from transformers import AutoConfig

    from ..paths import hub_errors, offline_if_unreachable

    if local is not None:
        try:
            config = AutoConfig.from_pretrained(local)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--init-from {init_from}: its config does not load: {err}") from None
    else:
        with offline_if_unreachable(), hub_errors("--init-from", init_from):
            config = AutoConfig.from_pretrained(init_from)
    if getattr(config, "model_type", None) == "kvshift":
        return config
    _check_architecture(config)
    return kvshift_config_from(config, "identity")


def _model_fields(config) -> dict:
    """ModelConfig's architecture fields as the checkpoint ``config`` has them."""
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "rms_norm_eps": float(config.rms_norm_eps), "kv_shift_position": config.kv_shift_position,
        "kv_shift_targets": config.kv_shift_targets, "kv_shift_window": config.kv_shift_window,
        "kv_shift_granularity": config.kv_shift_granularity, "kv_shift_residual": config.kv_shift_residual,
        "token_smear": config.token_smear,
    }


def init_from_checkpoint(cfg: TrainConfig, init_from: str | None = None, config=None) -> TrainConfig:
    """Set ``cfg.model.init_from`` and take the architecture fields from that checkpoint (call before the
    ``--set`` overrides, which :func:`check_model_fields` then holds against the checkpoint). The shift
    init becomes ``auto``: the checkpoint's own shift weights where it has them, identity where it has none."""
    if init_from is not None:
        cfg.model.init_from = str(init_from)
    config = config if config is not None else checkpoint_config(cfg.model.init_from)
    for name, value in _model_fields(config).items():
        setattr(cfg.model, name, value)
    cfg.model.kv_shift_init = "auto"
    return cfg


def check_model_fields(model_cfg: ModelConfig, config=None) -> None:
    """ValueError naming the first ``model.*`` field that differs from the checkpoint's architecture."""
    config = config if config is not None else checkpoint_config(model_cfg.init_from)
    for name, value in _model_fields(config).items():
        mine = getattr(model_cfg, name)
        if name == "vocab_size" and mine == 0:
            continue
        same = abs(float(mine) - float(value)) <= 1e-12 * max(1.0, abs(float(value))) \
            if isinstance(value, float) else mine == value
        if not same:
            raise ValueError(f"model.{name}={mine!r} would change the architecture of --init-from "
                             f"{model_cfg.init_from} (it has {name}={value!r}); with model.init_from the "
                             "architecture comes from the checkpoint: drop that override (from Python, call "
                             "kvshift.train.retrofit.init_from_checkpoint(cfg) first)")


def source_tokenizer(init_from: str):
    """The checkpoint's tokenizer (its chat template included), or None when it ships none."""
    from transformers import AutoTokenizer

    from ..models.convert import TOKENIZER_FILES
    from ..models.gguf import is_gguf, load_gguf_tokenizer

    if is_gguf(init_from):
        return load_gguf_tokenizer(init_from)
    local = _local(init_from)
    if local is not None:
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(str(local))
    from ..paths import offline_if_unreachable

    with offline_if_unreachable():
        try:
            return AutoTokenizer.from_pretrained(init_from)
        except Exception:  # noqa: BLE001 - a checkpoint without a tokenizer
            return None


def check_data_tokenizer(cfg: TrainConfig, train_ds, tokenizer, vocab_size: int) -> None:
    """ValueError (one line, naming both) unless the data was tokenized with the checkpoint's tokenizer."""
    where = f"--init-from {cfg.model.init_from}"
    if cfg.data.source != "prepared":
        raise ValueError(f"data.source={cfg.data.source} is a raw-byte corpus, but {where} has its own tokenizer: "
                         f"prepare data with it (`kvshift data prepare --tokenizer {cfg.model.init_from} ...`) and "
                         "pass --data DIR")
    data_dir = Path(cfg.data.path)
    if train_ds.vocab_size > vocab_size:
        raise ValueError(f"data {data_dir} has a vocabulary of {train_ds.vocab_size} ids but {where} has "
                         f"vocab_size {vocab_size}: tokenize the data with the checkpoint's tokenizer "
                         f"(`kvshift data prepare --tokenizer {cfg.model.init_from}`)")
    if tokenizer is None:
        return  # nothing more to compare against
    from transformers import AutoTokenizer

    data_tok = AutoTokenizer.from_pretrained(str(data_dir))
    mine, theirs = data_tok.get_vocab(), tokenizer.get_vocab()
    if mine != theirs:
        diff = next((t for t in sorted(mine) if theirs.get(t) != mine[t]), None)
        detail = (f"token {diff!r} is id {mine[diff]} in the data, {theirs.get(diff)} in the model" if diff
                  else f"{len(mine)} vs {len(theirs)} tokens")
        raise ValueError(f"tokenizer mismatch: data {data_dir} was tokenized with a different tokenizer than {where} "
                         f"({detail}); prepare the data with `kvshift data prepare --tokenizer "
                         f"{cfg.model.init_from}`")


def _shift_init(model_cfg: ModelConfig) -> str:
    return "identity" if model_cfg.kv_shift_init == "auto" else model_cfg.kv_shift_init


def load_start_model(cfg: TrainConfig, device_type: str = "cpu"):
    """The model training starts from: the checkpoint (fp32), with the shift added, kept or left out per
    ``cfg.model``; every non-shift weight is the checkpoint's. Returns ``(model, source_config)``."""
    from ..models import KVShiftConfig, KVShiftForCausalLM
    from ..models.convert import convert_checkpoint, random_init_warning
    from ..models.gguf import is_gguf
    from .loop import attention_for_device

    m = cfg.model
    init_from = m.init_from
    local = None if is_gguf(init_from) else _local(init_from)
    if local is not None and _is_kvshift_folder(local):
        source = KVShiftForCausalLM.from_pretrained(local, dtype=torch.float32)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            source = convert_checkpoint(init_from, None, init="identity", dtype=torch.float32)
    src_config = source.config
    check_model_fields(m, src_config)
    fields = src_config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "auto_map", "dtype", "torch_dtype"):
        fields.pop(key, None)
    # a kvshift checkpoint with the shift in some layers only keeps its per-layer choice
    layers = src_config.kv_shift if m.kv_shift and isinstance(src_config.kv_shift, list) else m.kv_shift
    fields.update(kv_shift=layers, kv_shift_init=_shift_init(m), kv_shift_parametrization=m.kv_shift_parametrization,
                  attn_implementation=attention_for_device(m.attn_implementation, device_type))
    src_has_shift = any(is_shift_parameter(n) for n, _ in source.named_parameters())
    if src_has_shift and m.kv_shift and src_config.kv_shift_parametrization != m.kv_shift_parametrization:
        raise ValueError(f"model.kv_shift_parametrization={m.kv_shift_parametrization!r} differs from the "
                         f"checkpoint's {src_config.kv_shift_parametrization!r}, whose shift weights it would misread")
    if m.kv_shift and m.kv_shift_init not in ("auto", "identity") and cfg_is_main():
        print(f"warning: {random_init_warning(m.kv_shift_init)}", file=sys.stderr)
    config = KVShiftConfig(**fields)
    torch.manual_seed(cfg.seed)
    model = KVShiftForCausalLM(config)
    state = {k: v for k, v in source.state_dict().items() if not is_shift_parameter(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_shift_parameter(k) and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"--init-from {init_from}: weights do not map: missing {missing[:6]}, unexpected {unexpected[:6]}")
    src_shift = dict(source.named_parameters())
    generator = torch.Generator().manual_seed(cfg.seed)
    for layer in model.model.layers:
        attn = layer.self_attn
        for p_name in ("k_shift", "v_shift", "q_shift"):
            if not hasattr(attn, p_name) or p_name[0] not in attn.mix_targets:
                continue
            full = f"model.layers.{attn.layer_idx}.self_attn.{p_name}"
            if m.kv_shift_init == "auto" and full in src_shift:
                w = src_shift[full].detach().float().clone()
            else:
                w = init_conv_weight(tuple(getattr(attn, p_name).shape), _shift_init(m), attn.parametrization,
                                     residual=attn.residual, generator=generator)
            getattr(attn, p_name).data = w.to(torch.float32)
    for name, p in model.named_parameters():  # the shift scalars stay fp32
        if is_shift_parameter(name):
            p.data = p.data.float()
    model.generation_config = source.generation_config
    model.config.use_cache = True
    del source
    return model, src_config


def cfg_is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def apply_trainable(model, cfg: TrainConfig):
    """Freeze per ``cfg.optim.trainable``; returns ``(model to train, trainable count, total count)``.
    ``shift-current`` (a control) trains only the current-token weights (a1, b1) with the previous-token
    weights held at 0: per-head scales of the same keys and values, without the previous token.
    ``lora`` wraps the model with PEFT (LoRA rank ``optim.lora_rank`` on :data:`LORA_TARGETS`) and keeps the
    shift scalars trainable."""
    mode = cfg.optim.trainable
    total = sum(p.numel() for p in model.parameters())
    if mode == "shift":
        for name, p in model.named_parameters():
            p.requires_grad_(is_shift_parameter(name))
    elif mode == "shift-current":  # the control: per-head scales a1, b1 only; a2 = b2 = 0 stay exactly 0
        for name, p in model.named_parameters():
            p.requires_grad_(is_shift_parameter(name))
        for layer in model.model.layers:
            attn = layer.self_attn
            if not attn.use_kv_shift:
                continue
            if not attn.paper_form or attn.parametrization != "free":
                raise ValueError("optim.trainable=shift-current needs the paper's shift with "
                                 "model.kv_shift_parametrization=free (it zeroes the previous-token weights)")
            for p in attn.shift_parameters():
                with torch.no_grad():
                    p[:, 1] = 0.0
                keep = torch.tensor([1.0, 0.0], dtype=p.dtype, device=p.device)
                p.register_hook(lambda g, keep=keep: g * keep)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.optim.lora_rank, lora_alpha=cfg.optim.lora_alpha or 2 * cfg.optim.lora_rank,
                          lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
        model = get_peft_model(model, lora)
        for name, p in model.named_parameters():
            if is_shift_parameter(name):
                p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode == "shift-current":
        trainable //= 2  # the previous-token column never changes
    return model, trainable, total


def merged_model(model):
    """The plain model to save at the end: LoRA merged into the weights (PEFT), or the model itself."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
