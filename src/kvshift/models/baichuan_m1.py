"""Baichuan-M1 checkpoints (``model_type: baichuan_m1``) as kvshift models.

Baichuan-M1 ("short convolution attention") is a production model built on KV shifting. Its layout,
read from its remote ``modeling_baichuan.py`` and mlx-lm's ``baichuan_m1`` port:

- ``self_attn.W_pack``: q, k and v fused, rows in that order (``H * D``, ``Hkv * D``, ``Hkv * D``);
- ``self_attn.conv_k`` / ``conv_v`` ``(1, 1, Hkv, 1, 2)``: a width-2 causal convolution over the raw K / V
  rows, used as they are (no softmax at run time). Index 0 multiplies the *previous* token and index 1
  the current one (``custom_convolution`` pads one zero row in front and unfolds ``[t - 1, t]``; the decode
  step is ``conv[..., :1] * last + conv[..., 1:] * current``). kvshift's ``k_shift`` / ``v_shift`` are
  ``[Hkv, 2]`` = (current, previous), so the columns swap;
- ``lm_head``: a NormHead, whose rows are L2-normalised in every forward; stored here normalised, so the
  converted model uses a plain linear head;
- ``sliding_window_layers`` (layer indices) with ``sliding_window``: those layers attend to the last
  ``sliding_window`` tokens (flash-attention's ``window_size=(sliding_window - 1, 0)``) and have their own
  head counts ``num_swa_attention_heads`` / ``num_swa_key_value_heads``; every layer's head size is
  ``hidden_size // heads``;
- Llama's RoPE (rotate-half) before attention, after the shift; RMSNorm; SwiGLU.

:func:`make_tiny_checkpoint` (``python scripts/tiny_baichuan_m1.py --to DIR``) writes a small random checkpoint in
this layout, for tests and the docs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..report import staged_dir
from .configuration import KVShiftConfig

__all__ = ["MODEL_TYPE", "is_baichuan_m1", "source_config", "kvshift_config_from_baichuan_m1", "convert_baichuan_m1_state",
           "load_baichuan_m1", "make_tiny_checkpoint"]

MODEL_TYPE = "baichuan_m1"
ARCHITECTURE = "BaichuanM1ForCausalLM"


def read_config(source: str | os.PathLike) -> dict | None:
    """The raw ``config.json`` of a local folder (None when there is none)."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def source_config(source: str) -> dict | None:
    """The raw ``config.json`` of a local folder or, for a hub id, of the Hub's copy (fetched alone: loading it
    through ``AutoConfig`` would need the checkpoint's remote code); None when there is none or the Hub cannot
    be reached (the regular loaders then report it)."""
    from ..paths import check_local_path

    local = check_local_path(source, "--from")
    if local is not None:
        return read_config(local) if local.is_dir() else None
    try:
        from huggingface_hub import hf_hub_download

        from ..paths import offline_if_unreachable

        with offline_if_unreachable():
            return read_config(Path(hf_hub_download(source, "config.json")).parent)
    except Exception:  # noqa: BLE001 - not found / offline / not a repo id
        return None


def is_baichuan_m1(raw: dict | None) -> bool:
    """Whether a raw config dict describes a Baichuan-M1 checkpoint."""
    if not raw:
        return False
    return raw.get("model_type") == MODEL_TYPE or ARCHITECTURE in (raw.get("architectures") or [])


def kvshift_config_from_baichuan_m1(raw: dict) -> KVShiftConfig:
    """The :class:`KVShiftConfig` of a Baichuan-M1 ``config.json`` (a dict)."""
    def need(name):
        if raw.get(name) is None:
            raise ValueError(f"cannot convert this Baichuan-M1 checkpoint: config.json has no {name!r}")
        return raw[name]

    hidden, layers = int(need("hidden_size")), int(need("num_hidden_layers"))
    window = raw.get("conv_window", 2)
    if window != 2:
        raise ValueError(f"cannot convert: conv_window={window}; Baichuan-M1's shift is defined for a window of 2 "
                         "(its own code asserts it), and so is kvshift's conversion")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"cannot convert: hidden_act={act!r}; Baichuan-M1 uses SwiGLU (silu)")
    heads, kv = int(need("num_attention_heads")), int(need("num_key_value_heads"))
    swa_layers = sorted(int(i) for i in raw.get("sliding_window_layers") or [])
    bad = [i for i in swa_layers if not 0 <= i < layers]
    if bad:
        raise ValueError(f"cannot convert: sliding_window_layers has {bad[0]}, outside 0..{layers - 1}")
    swa_heads = raw.get("num_swa_attention_heads") or heads
    swa_kv = raw.get("num_swa_key_value_heads") or kv
    for name, h in (("num_attention_heads", heads), ("num_swa_attention_heads", swa_heads)):
        if hidden % h:
            raise ValueError(f"cannot convert: hidden_size={hidden} is not divisible by {name}={h} (Baichuan-M1's "
                             "head size is hidden_size / heads)")
    window_tokens = raw.get("sliding_window") if swa_layers else None
    if swa_layers and not window_tokens:
        raise ValueError("cannot convert: sliding_window_layers is set but sliding_window is not")
    rope_theta = float(raw.get("rope_theta", 10000.0))
    return KVShiftConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        hidden_act="silu", max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        initializer_range=float(raw.get("initializer_range", 0.02)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        sliding_window=int(window_tokens) if window_tokens else None,
        layer_types=["sliding_attention" if i in swa_layers else "full_attention" for i in range(layers)],
        num_swa_attention_heads=int(swa_heads), num_swa_key_value_heads=int(swa_kv),
        swa_head_dim=hidden // int(swa_heads),
        kv_shift=True, kv_shift_init="identity", kv_shift_position="pre_rope", kv_shift_parametrization="free",
    )


def _conv_to_shift(conv: torch.Tensor, kv_heads: int, name: str) -> torch.Tensor:
    """``(1, 1, Hkv, 1, 2)`` (previous, current) -> kvshift's ``[Hkv, 2]`` (current, previous), fp32."""
    if tuple(conv.shape) != (1, 1, kv_heads, 1, 2):
        raise ValueError(f"{name} has shape {list(conv.shape)}, expected [1, 1, {kv_heads}, 1, 2]")
    w = conv.reshape(kv_heads, 2).float()
    return torch.stack([w[:, 1], w[:, 0]], dim=-1)


def convert_baichuan_m1_state(state: dict[str, torch.Tensor], config: KVShiftConfig) -> dict[str, torch.Tensor]:
    """A Baichuan-M1 state dict mapped onto :class:`KVShiftForCausalLM` names (``W_pack`` split, the shift
    weights reordered, the NormHead normalised)."""
    state = dict(state)
    out = {}
    for i in range(config.num_hidden_layers):
        shape = config.layer_attention(i)
        pre = f"model.layers.{i}.self_attn."
        packed = state.pop(pre + "W_pack.weight", None)
        if packed is None:
            raise ValueError(f"the checkpoint has no {pre}W_pack.weight")
        q_rows, kv_rows = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        if packed.shape[0] != q_rows + 2 * kv_rows:
            raise ValueError(f"{pre}W_pack.weight has {packed.shape[0]} rows; this layer's {shape.num_heads} heads and "
                             f"{shape.num_kv_heads} KV heads of size {shape.head_dim} need {q_rows + 2 * kv_rows}")
        q, k, v = packed.split([q_rows, kv_rows, kv_rows], dim=0)
        out[pre + "q_proj.weight"], out[pre + "k_proj.weight"], out[pre + "v_proj.weight"] = q, k, v
        for src, dst in (("conv_k", "k_shift"), ("conv_v", "v_shift")):
            conv = state.pop(pre + src, None)
            if conv is None:
                raise ValueError(f"the checkpoint has no {pre}{src}")
            out[pre + dst] = _conv_to_shift(conv, shape.num_kv_heads, pre + src)
    head = state.pop("lm_head.weight", None)
    if head is not None:  # NormHead: rows normalised at run time; stored normalised here
        out["lm_head.weight"] = F.normalize(head.float(), dim=-1).to(head.dtype)
    out.update(state)
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))  # no pickled code runs
        return state
    raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weights")


def _local_folder(source: str) -> Path:
    """A local checkpoint folder, or a Hub snapshot of the config, weights and tokenizer files."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from ..paths import hub_errors, offline_if_unreachable

    with offline_if_unreachable(), hub_errors("--from", source):
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer.model",
                                                              "tokenization_*.py"]))


def load_baichuan_m1(source: str | os.PathLike, dtype: torch.dtype | None = None):
    """A :class:`KVShiftForCausalLM` with a Baichuan-M1 checkpoint's weights (local folder or hub id), in the
    checkpoint's dtype unless ``dtype``; the shift weights stay fp32."""
    from .modeling import KVShiftForCausalLM, finish_meta_model

    folder = _local_folder(str(source))
    raw = read_config(folder)
    if not is_baichuan_m1(raw):
        raise ValueError(f"{source} is not a Baichuan-M1 checkpoint (config.json model_type is "
                         f"{(raw or {}).get('model_type')!r})")
    config = kvshift_config_from_baichuan_m1(raw)
    state = convert_baichuan_m1_state(_read_weights(folder), config)
    floats = [t.dtype for k, t in state.items() if t.dtype.is_floating_point and not k.endswith("_shift")]
    dtype = dtype or (floats[0] if floats else torch.float32)
    with torch.device("meta"):
        model = KVShiftForCausalLM(config)
    expected = set(model.state_dict())
    tied = config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
    if unexpected or missing:
        raise ValueError(f"the Baichuan-M1 weights do not map onto KVShiftForCausalLM: unexpected {unexpected[:8]}, "
                         f"missing {missing[:8]}")
    model.load_state_dict({k: v if k.endswith("_shift") or not v.dtype.is_floating_point else v.to(dtype)
                           for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    finish_meta_model(model)
    config.dtype = dtype
    model.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def make_tiny_checkpoint(out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64,
                         num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                         num_swa_attention_heads: int = 2, num_swa_key_value_heads: int = 1,
                         sliding_window_layers: tuple[int, ...] = (1, 3), sliding_window: int = 8,
                         intermediate_size: int = 128, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a small random checkpoint in Baichuan-M1's layout (its config fields, ``W_pack``, ``conv_k`` /
    ``conv_v`` drawn as Baichuan initialises them: a softmax of a normal draw, an un-normalised NormHead)
    to ``out_dir``, with a vocabulary of 257 (kvshift's byte-level tokenizer: pass ``tokenizer`` to save one
    beside it). For tests and the docs: its weights are random, so it computes nothing meaningful."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    g = torch.Generator().manual_seed(seed)
    vocab = 257  # the byte tokenizer's 256 bytes + <|endoftext|>
    config = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": vocab, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "num_swa_attention_heads": num_swa_attention_heads, "num_swa_key_value_heads": num_swa_key_value_heads,
        "sliding_window": sliding_window, "sliding_window_layers": list(sliding_window_layers), "conv_window": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 256, "pad_token_id": 256,
        "torch_dtype": "float32",
    }

    def normal(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    state = {"model.embed_tokens.weight": normal(vocab, hidden_size, std=0.5),
             "model.norm.weight": 1 + normal(hidden_size, std=0.1),
             "lm_head.weight": normal(vocab, hidden_size, std=0.5)}
    for i in range(num_hidden_layers):
        swa = i in sliding_window_layers
        h = num_swa_attention_heads if swa else num_attention_heads
        kv = num_swa_key_value_heads if swa else num_key_value_heads
        d = hidden_size // h
        pre = f"model.layers.{i}."
        state.update({
            pre + "self_attn.W_pack.weight": normal(hidden_size + 2 * kv * d, hidden_size),
            pre + "self_attn.o_proj.weight": normal(hidden_size, h * d),
            pre + "self_attn.conv_k": torch.softmax(torch.randn(1, 1, kv, 1, 2, generator=g), dim=-1),
            pre + "self_attn.conv_v": torch.softmax(torch.randn(1, 1, kv, 1, 2, generator=g), dim=-1),
            pre + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            pre + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            pre + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
            pre + "input_layernorm.weight": 1 + normal(hidden_size, std=0.1),
            pre + "post_attention_layernorm.weight": 1 + normal(hidden_size, std=0.1),
        })
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out

