"""`kvshift convert`: turn a Llama / Qwen2 / Qwen3 / Mistral causal LM, or a Baichuan-M1 checkpoint (see
:mod:`kvshift.models.baichuan_m1`), into a `KVShiftForCausalLM` checkpoint.

The converted model has the source's weights under the same names plus the KV-shift weights
``model.layers.{i}.self_attn.k_shift/v_shift``. With ``init="identity"`` (current token 1, previous 0)
the converted model computes exactly the source model, so continued pretraining starts from it;
``init="paper"`` draws the paper's convex random mix instead. The output directory is written
atomically: a failure leaves no partial directory behind.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..layers.attention import init_shift_weight, is_shift_parameter
from ..report import staged_dir
from .baichuan_m1 import is_baichuan_m1, load_baichuan_m1
from .baichuan_m1 import source_config as m1_source_config
from .configuration import KV_SHIFT_INITS, KVShiftConfig
from .gguf import check_gguf, is_gguf, load_gguf_config, load_gguf_model, load_gguf_tokenizer
from .modeling import KVShiftForCausalLM, finish_meta_model

__all__ = ["SUPPORTED_ARCHITECTURES", "convert_checkpoint", "kvshift_config_from", "random_init_warning",
           "load_source_model"]

# model_type -> architecture (the causal-LM class whose weights we know how to map)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# and Baichuan-M1 (a KV-shift model of its own: trained shift weights, sliding-window layers), read from its files
_SUPPORTED_NAMES = ", ".join([*SUPPORTED_ARCHITECTURES.values(), "BaichuanM1ForCausalLM"])

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Files that make up a Hugging Face tokenizer (copied verbatim from a local source directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def random_init_warning(init: str) -> str:
    """The one-line warning for a shift init that changes what a pretrained model computes."""
    return (f"kv_shift_init={init!r} replaces the identity shift, so the model no longer computes what the "
            "pretrained checkpoint computed (its loss rises until training recovers it); use 'identity' to "
            "start from the checkpoint exactly")


def _unsupported(name: str) -> ValueError:
    return ValueError(f"cannot convert architecture {name!r}: supported architectures are {_SUPPORTED_NAMES}")


def _check_architecture(config, class_name: str | None = None) -> str:
    """The source's model_type, or a ValueError naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if class_name is not None:  # a model object: its class decides
        if class_name not in SUPPORTED_ARCHITECTURES.values():
            raise _unsupported(class_name)
    else:
        archs = list(getattr(config, "architectures", None) or [])
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES.values()]
        if bad:
            raise _unsupported(bad[0])
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(class_name or f"model_type={model_type}")
    return model_type


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")


def _rope_parameters(config) -> dict:
    """The source's RoPE in transformers' standard form (``rope_type``, ``rope_theta``, scaling fields)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"cannot convert: per-layer-type RoPE parameters ({rope}) are not supported")
        out = dict(rope)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
    out.setdefault("rope_type", out.pop("type", "default"))
    out.setdefault("rope_theta", float(getattr(config, "rope_theta", None) or 10000.0))
    return out


def _sliding_window(config, model_type: str) -> tuple[int | None, list[str] | None]:
    """``(sliding_window, layer_types)`` of the source: which layers slide, over how many tokens."""
    if model_type == "llama":
        return None, None
    window = getattr(config, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None, None
    if not window:
        return None, None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return int(window), None  # a window in every layer (Mistral)
    bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ValueError(f"cannot convert: layer_types has {bad[0]!r}; kvshift has full_attention and "
                         "sliding_attention layers")
    if "sliding_attention" not in layer_types:
        return None, None
    return int(window), list(layer_types)


def kvshift_config_from(config, init: str = "identity") -> KVShiftConfig:
    """A :class:`KVShiftConfig` with the hyper-parameters of a Llama / Qwen2 / Qwen3 / Mistral config."""
    model_type = _check_architecture(config)
    if init not in KV_SHIFT_INITS:
        raise ValueError(f"init must be one of {KV_SHIFT_INITS}, got {init!r}")
    partial = getattr(config, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"cannot convert: partial_rotary_factor={partial} is not supported (full RoPE only)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window, layer_types = _sliding_window(config, model_type)
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rms_norm_eps=config.rms_norm_eps,
        use_cache=getattr(config, "use_cache", True),
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(config),
        attention_bias=bool(getattr(config, "attention_bias", False)) if model_type in ("llama", "qwen3") else False,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=window,
        layer_types=layer_types,
        kv_shift=True,
        kv_shift_init=init,
        kv_shift_position="pre_rope",
    )
    return KVShiftConfig(**kwargs)


def _is_baichuan_m1_source(source: str) -> bool:
    """Whether ``source`` (a local folder or a hub id) is a Baichuan-M1 checkpoint, from its config.json."""
    return not is_gguf(source) and is_baichuan_m1(m1_source_config(source))


def _load_source(source: str, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..paths import check_local_path, hub_errors, offline_if_unreachable

    if is_gguf(source):  # a GGUF file: dequantised by transformers' GGUF loader (fp32 unless dtype)
        check_gguf(source)
        _check_architecture(load_gguf_config(source))
        return load_gguf_model(source, dtype)
    local = check_local_path(source, "--from")  # a missing path-like source fails here, before any Hub lookup
    if local is not None:
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a Hugging Face model directory (no config.json)")
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load a model config from {source!r}: {err}") from err
        _check_architecture(config)
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
    with offline_if_unreachable(), hub_errors("--from", source):
        config = AutoConfig.from_pretrained(source)
    _check_architecture(config)
    with offline_if_unreachable(), hub_errors("--from", source):
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")


load_source_model = _load_source


def _convert_model(source: nn.Module, init: str, dtype: torch.dtype | None, *, share: bool,
                   seed: int | None) -> KVShiftForCausalLM:
    _check_architecture(source.config, type(source).__name__)
    config = kvshift_config_from(source.config, init)
    src_dtype = next(source.parameters()).dtype
    dtype = dtype or src_dtype
    with torch.device("meta"):
        model = KVShiftForCausalLM(config)

    state = {k: v for k, v in source.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    expected = set(model.state_dict())
    shift_keys = {k for k in expected if is_shift_parameter(k)}
    tied = config.tie_word_embeddings
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - shift_keys - ({"lm_head.weight"} if tied else set()))
    if unexpected or missing:
        raise ValueError(
            f"the {type(source).__name__} weights do not map onto KVShiftForCausalLM: "
            f"unexpected {unexpected[:8]}, missing {missing[:8]}"
        )
    if tied:
        state.pop("lm_head.weight", None)

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dtype.is_floating_point and t.dtype != dtype:
            return t.to(dtype)
        return t if share else t.clone()

    model.load_state_dict({k: cast(v) for k, v in state.items()}, strict=False, assign=True)
    device = model.model.embed_tokens.weight.device
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.use_kv_shift:
            for name in ("k_shift", "v_shift"):
                w = init_shift_weight(attn.num_kv_heads, init, attn.parametrization, generator=generator)
                # fp32 whatever the model's dtype: a bf16 weight of 1 cannot take a step of 1e-4
                setattr(attn, name, nn.Parameter(w.to(device=device, dtype=torch.float32)))
    finish_meta_model(model, device)
    config.dtype = dtype
    gen = getattr(source, "generation_config", None)
    if gen is not None:
        model.generation_config = copy.deepcopy(gen)
    return model.eval()


def _tokenizer_dir(source) -> Path | None:
    """The local directory holding the source's tokenizer files, if any."""
    if isinstance(source, (str, Path)):
        name = str(source)
    else:
        name = getattr(source, "name_or_path", "") or getattr(source.config, "_name_or_path", "") or ""
    if not name:  # a model built in memory has no directory (and Path("") would be the cwd)
        return None
    path = Path(name)
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    return None


def _tokenizer_code_files(folder: Path) -> list[str]:
    """The ``.py`` modules a tokenizer_config.json's ``auto_map`` names (a tokenizer loaded with remote code)."""
    import json

    try:
        auto = json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        return []
    names = []
    for ref in auto.values():
        for item in ref if isinstance(ref, list) else [ref]:
            if isinstance(item, str) and "." in item and "--" not in item:
                name = item.rsplit(".", 1)[0] + ".py"
                if (folder / name).is_file() and name not in names:
                    names.append(name)
    return names


def _check_tokenizer_vocab(tokenizer, vocab_size: int, where) -> None:
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer at {where} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )


def _write_tokenizer(source, tokenizer, dest: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    if tokenizer is not None:  # an explicit tokenizer (object or name)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        _check_tokenizer_vocab(tokenizer, vocab_size, "the given tokenizer")
        tokenizer.save_pretrained(dest)
        return
    if is_gguf(source):  # the tokenizer (and chat template) stored in the GGUF file
        tok = load_gguf_tokenizer(source)
        _check_tokenizer_vocab(tok, vocab_size, source)
        tok.save_pretrained(dest)
        return
    local = _tokenizer_dir(source)
    if local is not None:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a model type transformers does not know (baichuan_m1) is no news here
        try:
            tok = AutoTokenizer.from_pretrained(str(local))
        except Exception:  # noqa: BLE001 - an unloadable tokenizer is copied as is, unchecked
            tok = None
        finally:
            hf_logging.set_verbosity(level)
        _check_tokenizer_vocab(tok, vocab_size, local)
        for name in TOKENIZER_FILES:
            if (local / name).is_file():
                shutil.copy2(local / name, dest / name)
        for name in _tokenizer_code_files(local):  # a custom tokenizer class (Baichuan's): its module too
            shutil.copy2(local / name, dest / name)
        return
    if isinstance(source, str):  # a hub id: fetch its tokenizer if it has one
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception:  # noqa: BLE001 - a checkpoint without a tokenizer is still converted
            return
        _check_tokenizer_vocab(tok, vocab_size, source)
        tok.save_pretrained(dest)


def _save_atomically(model: KVShiftForCausalLM, out_dir: Path, source, tokenizer, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty (pass --overwrite to replace it)")
    with staged_dir(out_dir) as tmp:  # an old output (overwrite) is moved aside, and back if the swap fails
        model.save_pretrained(tmp)
        _write_tokenizer(source, tokenizer, tmp, model.config.vocab_size)


def convert_checkpoint(
    source,
    out_dir: str | Path | None = None,
    *,
    init: str = "identity",
    dtype=None,
    tokenizer=None,
    seed: int | None = None,
    overwrite: bool = False,
) -> KVShiftForCausalLM:
    """Convert a Llama / Qwen2 / Qwen3 / Mistral causal LM, or a Baichuan-M1 checkpoint, to a
    :class:`KVShiftForCausalLM`.

    A Baichuan-M1 folder (``model_type: baichuan_m1``) keeps its trained shift weights, sliding-window layers
    and their head counts (:mod:`kvshift.models.baichuan_m1`); it is read from its files, never through its
    remote code, and ``init`` must stay ``"identity"``.

    Args:
        source: a local checkpoint directory, hub id or GGUF file (dequantised by transformers' GGUF
            loader; needs ``pip install 'kvshift[gguf]'``), loaded with ``AutoModelForCausalLM``, or a
            ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` object (its weights are
            copied, never shared).
        out_dir: where to save the converted model (safetensors) and the source's tokenizer; written
            atomically. ``None``: only return the model.
        init: ``"identity"`` (the converted model equals the source exactly), ``"near-identity"``,
            ``"paper"`` or ``"softmax"`` (the last three change what the model computes: a warning says so).
        dtype: ``None`` (keep the source's), a ``torch.dtype`` or ``"float32"``/``"bfloat16"``/``"float16"``.
        tokenizer: a tokenizer object or path to save beside the model instead of the source's.
        seed: seed of the random shift weights (``init="paper"``/``"softmax"``).
        overwrite: replace a non-empty ``out_dir`` (otherwise ``FileExistsError``).

    Raises:
        ValueError: unsupported architecture (the message lists the supported ones), unsupported RoPE
            variant, weights that do not map, tokenizer larger than the vocabulary.
        FileNotFoundError: ``source`` is a directory without a model config.
    """
    if init not in KV_SHIFT_INITS:
        raise ValueError(f"init must be one of {KV_SHIFT_INITS}, got {init!r}")
    if init != "identity":
        warnings.warn(random_init_warning(init), UserWarning, stacklevel=2)
    torch_dtype = _resolve_dtype(dtype)
    if out_dir is not None and not overwrite:
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    if isinstance(source, (str, Path)) and _is_baichuan_m1_source(str(source)):
        if init != "identity":
            raise ValueError(f"init={init!r}: a Baichuan-M1 checkpoint carries its own trained shift weights (conv_k, "
                             "conv_v), which the conversion keeps; --init applies to checkpoints without a shift")
        model = load_baichuan_m1(str(source), torch_dtype)
        source = model.name_or_path  # the local folder (a Hub snapshot for a hub id): its tokenizer files are copied
    elif isinstance(source, (str, Path)):
        src_model = _load_source(str(source), torch_dtype)
        model = _convert_model(src_model, init, torch_dtype, share=True, seed=seed)
        del src_model
    elif isinstance(source, nn.Module) and hasattr(source, "config"):
        model = _convert_model(source, init, torch_dtype, share=False, seed=seed)
    else:
        raise ValueError(f"source must be a path, a hub id or a PreTrainedModel, got {type(source).__name__}")
    if out_dir is not None:
        _save_atomically(model, Path(out_dir), source, tokenizer, overwrite)
    return model


# --- CLI ------------------------------------------------------------------------------------------------
