"""``kvshift export mlx``: a kvshift checkpoint -> an mlx-lm model folder (Apple silicon, or MLX on Linux CPU).

The folder holds the Hugging Face weights as safetensors (fp32; each layer's shift as its effective
(current, previous) weights per KV head), a ``config.json`` whose ``model_file`` names ``kvshift_mlx.py``
(copied beside it: kvshift's model written in MLX, see that file) and the tokenizer files. mlx-lm's own
tools use it unchanged with ``trust_remote_code``: ``mlx_lm.generate``, ``mlx_lm.server`` and
``mlx_lm.convert -q`` (quantisation). ``bits`` quantises through ``mlx_lm.convert`` (needs ``mlx-lm``);
exporting fp32 needs only PyTorch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["MLX_MODEL_FILE", "check_exportable", "export_mlx"]

MLX_MODEL_FILE = "kvshift_mlx.py"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta",
                  "rope_parameters", "tie_word_embeddings", "attention_bias", "qkv_bias", "qk_norm", "mlp_bias",
                  "bos_token_id", "eos_token_id", "pad_token_id", "layer_types", "sliding_window",
                  "num_swa_attention_heads", "num_swa_key_value_heads", "swa_head_dim")


def check_exportable(config) -> None:
    """Raise ``ValueError`` naming the config field when the MLX model cannot express this checkpoint."""
    wants = {"kv_shift_targets": "kv", "kv_shift_window": 2, "kv_shift_granularity": "head",
             "kv_shift_residual": False, "kv_shift_position": "pre_rope", "token_smear": False, "hidden_act": "silu"}
    for name, value in wants.items():
        got = getattr(config, name, value)
        if got != value:
            raise ValueError(f"kvshift export mlx writes the paper's shift (K and V, window 2, per KV head, before "
                             f"RoPE) in a SwiGLU model; this checkpoint has {name}={got!r} "
                             f"(the MLX model needs {name}={value!r})")


def _mlx_config(config) -> dict:
    out = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    out.update(model_type="kvshift", model_file=MLX_MODEL_FILE, architectures=["KVShiftForCausalLM"],
               kv_shift=[bool(config.layer_has_kv_shift(i)) for i in range(config.num_hidden_layers)])
    return out


@torch.no_grad()
def _weights(model) -> dict:
    """The state dict as float32 numpy arrays, with effective shift weights."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("k_shift", "v_shift")):
            continue
        tensors[name] = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    for i, layer in enumerate(model.model.layers):
        weights = layer.self_attn.shift_weights()
        if weights is not None:
            for kind, w in zip(("k_shift", "v_shift"), weights):
                tensors[f"model.layers.{i}.self_attn.{kind}"] = w.detach().float().cpu().contiguous().numpy()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def export_mlx(model_dir: str | Path, out_dir: str | Path, bits: int | None = None, group_size: int = 64,
               overwrite: bool = False) -> Path:
    """Write the mlx-lm folder of the kvshift checkpoint ``model_dir`` to ``out_dir`` (atomically), quantised
    to ``bits`` (4 or 8, by ``mlx_lm.convert``) when given. Returns ``out_dir``."""
    from safetensors.numpy import save_file

    from ..models import KVShiftConfig, KVShiftForCausalLM
    from ..report import apply_umask, replace_dir

    model_dir, out = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir} is not a kvshift checkpoint folder (no config.json)")
    if bits not in (None, 4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    config = KVShiftConfig.from_pretrained(model_dir)
    check_exportable(config)
    if bits is not None:
        try:
            from mlx_lm.convert import convert
        except ImportError as err:
            raise ValueError("--bits quantises with mlx-lm: pip install mlx-lm (on Linux: pip install "
                             "'mlx[cpu]' mlx-lm)") from err
    model = KVShiftForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        plain = tmp / "fp32" if bits is not None else tmp / "out"
        plain.mkdir()
        save_file(_weights(model), str(plain / "model.safetensors"), metadata={"format": "mlx"})
        (plain / "config.json").write_text(json.dumps(_mlx_config(config), indent=2) + "\n")
        shutil.copy2(Path(__file__).with_name(MLX_MODEL_FILE), plain / MLX_MODEL_FILE)
        for name in _COPIED:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, plain / name)
        final = plain
        if bits is not None:
            final = tmp / "out"
            convert(str(plain), str(final), quantize=True, q_bits=bits, q_group_size=group_size,
                    trust_remote_code=True)
            shutil.copy2(plain / MLX_MODEL_FILE, final / MLX_MODEL_FILE)
        apply_umask(final)
        replace_dir(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
