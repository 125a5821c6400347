"""`KVShiftConfig`: a Hugging Face config with `LlamaConfig` field names plus the KV-shift switches."""

from __future__ import annotations

import difflib
from typing import NamedTuple

from huggingface_hub.dataclasses import strict
from transformers import GenerationConfig, PreTrainedConfig
from transformers.utils import logging

from ..layers.attention import KV_SHIFT_INITS, NEAR_IDENTITY_CURRENT  # the layer owns its inits

logger = logging.get_logger(__name__)

__all__ = ["KVShiftConfig", "LayerAttention", "LAYER_TYPES", "AUTO_MAP", "REMOTE_CODE_MODULE", "write_remote_code", "KV_SHIFT_INITS", "NEAR_IDENTITY_CURRENT", "KV_SHIFT_POSITIONS", "KV_SHIFT_TARGETS", "TOKEN_MIXING_VARIANTS"]

KV_SHIFT_POSITIONS = ("pre_rope", "post_rope")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names (Gemma 3, Qwen 3, Mistral)


class LayerAttention(NamedTuple):
    """The attention shape of one layer: what :meth:`KVShiftConfig.layer_attention` answers."""

    layer_type: str  # "full_attention" or "sliding_attention"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # tokens a query sees, itself included; None for full attention


KV_SHIFT_PARAMETRIZATIONS = ("free", "gate", "clamp")
KV_SHIFT_TARGETS = ("kv", "k", "v", "qkv")
KV_SHIFT_GRANULARITIES = ("head", "channel")
MAX_KV_SHIFT_WINDOW = 8

# Named token-mixing variants of the lab (`kvshift reproduce ablations` / `relatives`): config fields that
# turn the one model into each relative of KV shifting. "vanilla" switches every mixer off.
TOKEN_MIXING_VARIANTS: dict[str, dict] = {
    "vanilla": {"kv_shift": False},
    "kv": {},  # the paper: K and V, window 2, one weight pair per KV head
    "k": {"kv_shift_targets": "k"},
    "v": {"kv_shift_targets": "v"},
    "qkv": {"kv_shift_targets": "qkv"},  # paper App. J
    "kv-gate": {"kv_shift_parametrization": "gate"},
    "kv-clamp": {"kv_shift_parametrization": "clamp"},
    "kv-w3": {"kv_shift_window": 3},  # paper §4.8
    "kv-w4": {"kv_shift_window": 4},
    "kv-channel": {"kv_shift_granularity": "channel"},
    "kv-channel-w3": {"kv_shift_granularity": "channel", "kv_shift_window": 3},
    "kv-channel-w4": {"kv_shift_granularity": "channel", "kv_shift_window": 4},
    # Canon-B-like: a per-channel causal convolution of width 4 with a residual on Q, K and V
    "canon-b": {"kv_shift_targets": "qkv", "kv_shift_window": 4, "kv_shift_granularity": "channel",
                "kv_shift_residual": True},
    # Primer-like (multi-dconv-head attention): a per-channel width-3 convolution on Q, K and V
    "primer": {"kv_shift_targets": "qkv", "kv_shift_window": 3, "kv_shift_granularity": "channel"},
    # nanochat / modded-nanogpt style: a gated add of the previous token's embedding, no shift in attention
    "smear": {"kv_shift": False, "token_smear": True},
}

# Saved checkpoints carry an `auto_map` to a one-line module that imports kvshift's classes, so that
# `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works in any process where kvshift is
# installed (plain transformers, the lm_eval CLI, a Hub download) and names kvshift where it is not.
REMOTE_CODE_MODULE = "kvshift_auto"
AUTO_MAP = {
    auto: f"{REMOTE_CODE_MODULE}.{cls}" for auto, cls in [
        ("AutoConfig", "KVShiftConfig"), ("AutoModel", "KVShiftModel"), ("AutoModelForCausalLM", "KVShiftForCausalLM"),
        ("AutoModelForSequenceClassification", "KVShiftForSequenceClassification"),
        ("AutoModelForTokenClassification", "KVShiftForTokenClassification"),
        ("AutoModelForQuestionAnswering", "KVShiftForQuestionAnswering"),
    ]
}
REMOTE_CODE = (
    '"""kvshift\'s model classes for `trust_remote_code=True`. The model code is the kvshift package itself:\n'
    'install it with `pip install kvshift` (https://pypi.org/project/kvshift)."""\n\n'
    "from kvshift.models import (  # noqa: F401\n"
    "    KVShiftConfig,\n    KVShiftForCausalLM,\n    KVShiftForQuestionAnswering,\n"
    "    KVShiftForSequenceClassification,\n    KVShiftForTokenClassification,\n    KVShiftModel,\n)\n"
)


def write_remote_code(save_directory) -> None:
    """Write the ``auto_map`` module beside a saved config (to a temporary name, then renamed)."""
    import os
    from pathlib import Path

    path = Path(save_directory) / f"{REMOTE_CODE_MODULE}.py"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(REMOTE_CODE)
    os.replace(tmp, path)


# Keys that Hugging Face itself passes through a config's constructor (loading, BC, generation).
_PASS_THROUGH_KEYS = {
    "torch_dtype", "name_or_path", "output_attentions", "attn_implementation", "experts_implementation",
    "per_layer_config", "num_labels", "model_type", "auto_map", "tokenizer_class", "use_return_dict",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "pretraining_tp", "mlp_bias",
    "max_window_layers", "use_sliding_window", "attention_dropout", "initializer_range", "hidden_act",
}


@strict
class KVShiftConfig(PreTrainedConfig):
    r"""Configuration of :class:`kvshift.KVShiftForCausalLM` (a Llama-style decoder with KV shifting).

    Field names follow :class:`transformers.LlamaConfig`; the extra fields are:

    - ``kv_shift``: ``True``/``False`` for every layer, or a list with one bool per layer.
    - ``kv_shift_init``: ``"paper"`` (current weight ~ U(0, 1), previous = 1 - current, drawn
      independently for K and V of every KV head), ``"identity"`` (current 1, previous 0: the model
      computes exactly vanilla attention, used when converting checkpoints) or ``"softmax"``
      (Baichuan-M1 style, softmax of a normal draw) or ``"near-identity"`` (current 0.9, previous 0.1 for
      every head: a retrofit start that already mixes in the previous token a little).
    - ``kv_shift_position``: ``"pre_rope"`` (the paper's order) or ``"post_rope"``.
    - ``kv_shift_parametrization``: ``"free"`` (paper), ``"gate"`` (current = sigmoid(a), previous =
      1 - current; for windows over 2 a softmax over the window) or ``"clamp"`` (each weight clamped to
      [0, 1]); the ablations of the paper's §4.7.
    - ``kv_shift_targets``: which projections are mixed: ``"kv"`` (paper), ``"k"``, ``"v"`` or ``"qkv"``
      (paper App. J). The weights are ``q_shift`` / ``k_shift`` / ``v_shift``.
    - ``kv_shift_window``: how many tokens each mixed row sees, the current one included: 2 (paper), 3
      (paper §4.8), up to 8. Wider windows are the causal short convolution :func:`kvshift.ops.short_conv`.
    - ``kv_shift_granularity``: ``"head"`` (paper: one weight per head and lag, ``[heads, window]``) or
      ``"channel"`` (Primer / Canon style: ``[heads, head_dim, window]``).
    - ``kv_shift_residual``: add the convolution to its input, ``x + conv(x)`` (Canon style); the
      ``"paper"`` init then draws U(-1/sqrt(w), 1/sqrt(w)) (a depthwise ``Conv1d``'s default) and
      ``"identity"`` is all zeros.
    - ``token_smear``: add a gated share of the previous token's embedding to each token embedding,
      ``e_t + lambda * sigmoid(g . e_t[:24]) * e_{t-1}`` (nanochat / modded-nanogpt's smear; ``lambda`` and
      ``g`` start at 0, so the model starts as without it).

    Every mixer sees zero predecessors at sequence and document starts and never reads padding; the
    decode state keeps the raw last ``window - 1`` rows of each mixed projection. The paper's case
    (``"kv"``, window 2, per head, no residual) runs the fused :func:`kvshift.kv_shift` kernels, the
    others the PyTorch :func:`kvshift.ops.short_conv`. :data:`TOKEN_MIXING_VARIANTS` names the lab's
    variants.
    - ``qkv_bias``: bias on q/k/v projections only (Qwen2); ``attention_bias`` adds it to all four (Llama).
    - ``sliding_window`` and ``layer_types``: transformers' convention. ``layer_types`` has one entry per
      layer, ``"full_attention"`` or ``"sliding_attention"`` (a query sees itself and the
      ``sliding_window - 1`` tokens before it); when not given, every layer is ``"sliding_attention"`` if
      ``sliding_window`` is set (Mistral) and ``"full_attention"`` otherwise. The shift is unaffected by the
      window: the decode state keeps the raw last row, which never leaves with the window.
    - ``num_swa_attention_heads``, ``num_swa_key_value_heads``, ``swa_head_dim``: the sliding-window layers'
      own head counts and head size (Baichuan-M1's names; each defaults to the full layers' value, and
      ``swa_head_dim`` to ``hidden_size // num_swa_attention_heads`` when only the head count is given, as
      in Baichuan-M1). :meth:`layer_attention` gives any layer's shape.
    - ``qk_norm``: per-head RMSNorm on queries and keys (Qwen3). On keys it acts on the *shifted* key,
      before RoPE (shift -> k-norm -> RoPE, BlaGPT's order; with ``post_rope``: k-norm -> RoPE -> shift),
      so the attention logits stay bounded as QK-norm intends; the decode state keeps the raw projection.
    """

    model_type = "kvshift"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan (`from_pretrained(..., tp_plan="auto")` under torchrun): Llama's, plus the
        per-KV-head shift weights sharded with the K/V heads they mix (dim 0) and used locally by their
        layer; entries only for parameters this config has."""
        attn, mlp = "layers.*.self_attn", "layers.*.mlp"
        plan = {f"{attn}.q_proj": "colwise", f"{attn}.k_proj": "colwise", f"{attn}.v_proj": "colwise"}
        targets = getattr(self, "kv_shift_targets", "kv")
        if getattr(self, "qk_norm", False):
            plan.update({f"{attn}.q_norm": "replicated_with_grad_allreduce",
                         f"{attn}.k_norm": "replicated_with_grad_allreduce"})
        if any(self.layer_has_kv_shift(i) for i in range(self.num_hidden_layers)):
            plan.update({f"{attn}.{t}_shift": "colwise" for t in "qkv" if t in targets})
            plan[attn] = "local_params"
        plan.update({f"{attn}.o_proj": "rowwise", f"{mlp}.gate_proj": "colwise", f"{mlp}.up_proj": "colwise",
                     f"{mlp}.down_proj": "rowwise"})
        return plan

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan: dict[str, str] | None) -> None:
        # transformers < 5.20 (the serving env's) assigns the plan in __post_init__ to add a tied embedding's
        # "embed_tokens" entry, which 5.20+ no longer has; the plan stays the one computed from the fields
        # (storing the assignment would write it into config.json)
        pass

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    num_swa_attention_heads: int | None = None
    num_swa_key_value_heads: int | None = None
    swa_head_dim: int | None = None
    kv_shift: bool | list[bool] = True
    kv_shift_init: str = "paper"
    kv_shift_position: str = "pre_rope"
    kv_shift_parametrization: str = "free"
    kv_shift_targets: str = "kv"
    kv_shift_window: int = 2
    kv_shift_granularity: str = "head"
    kv_shift_residual: bool = False
    token_smear: bool = False

    def __post_init__(self, **kwargs):
        unknown = sorted(
            k for k in kwargs
            if not k.startswith("_") and k not in _PASS_THROUGH_KEYS
            and k not in GenerationConfig._get_default_generation_params()
        )
        for key in unknown:
            # Kept as a plain attribute, as every transformers config does (a config that save_pretrained
            # wrote must load), but a name close to a real field is most likely a typo: say so.
            close = difflib.get_close_matches(key, list(self.__dataclass_fields__), n=1, cutoff=0.8)
            if close:
                logger.warning(f"KVShiftConfig: unknown field {key!r} kept as an attribute; did you mean "
                               f"{close[0]!r}?")
        # rope_parameters / legacy rope_scaling are standardised by transformers (super().__post_init__)
        partial = kwargs.pop("partial_rotary_factor", None)
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial} is not supported (kvshift rotates every channel)")
        if kwargs.get("auto_map") == AUTO_MAP:  # our own auto_map (saved by save_pretrained): not kept in memory
            kwargs.pop("auto_map")
        for key in ("pretraining_tp", "max_window_layers", "use_sliding_window"):
            kwargs.pop(key, None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:  # transformers' rule: a window with no layer types slides in every layer
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        else:
            self.layer_types = list(self.layer_types)
        self._check_swa_fields()
        if self.swa_head_dim is None and self.num_swa_attention_heads and self.hidden_size % self.num_swa_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_swa_attention_heads "
                             f"({self.num_swa_attention_heads}), or set swa_head_dim explicitly")
        if self.swa_head_dim is None:
            self.swa_head_dim = (self.hidden_size // self.num_swa_attention_heads if self.num_swa_attention_heads
                                 else self.head_dim)
        self._check_layers()
        if isinstance(self.kv_shift, (list, tuple)):
            self.kv_shift = [bool(v) for v in self.kv_shift]
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)  # never alias the caller's dict
        super().__post_init__(**kwargs)
        # one source of truth: rope_parameters (transformers' format); rope_theta mirrors it
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_theta = float(self.rope_parameters.get("rope_theta", self.rope_theta))
        self.rope_parameters["rope_theta"] = self.rope_theta
        try:
            self.validate_rope()
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"rope_parameters {self.rope_parameters} are invalid: {err}") from err

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save ``config.json`` with kvshift's ``auto_map`` and, beside it, the module it names (see
        ``AUTO_MAP``): the folder then loads with ``trust_remote_code=True`` wherever kvshift is installed."""
        import os

        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(save_directory)  # before the config, so a Hub push uploads both
        had = getattr(self, "auto_map", None)
        self.auto_map = {**AUTO_MAP, **(had or {})}
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            if had is None:
                del self.auto_map
            else:
                self.auto_map = had

    def _check(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            positive(name)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim}")
        if self.kv_shift_init not in KV_SHIFT_INITS:
            raise ValueError(f"kv_shift_init must be one of {KV_SHIFT_INITS}, got {self.kv_shift_init!r}")
        if self.kv_shift_position not in KV_SHIFT_POSITIONS:
            raise ValueError(
                f"kv_shift_position must be one of {KV_SHIFT_POSITIONS}, got {self.kv_shift_position!r}"
            )
        if self.kv_shift_parametrization not in KV_SHIFT_PARAMETRIZATIONS:
            raise ValueError(
                f"kv_shift_parametrization must be one of {KV_SHIFT_PARAMETRIZATIONS}, "
                f"got {self.kv_shift_parametrization!r}"
            )
        if self.kv_shift_targets not in KV_SHIFT_TARGETS:
            raise ValueError(f"kv_shift_targets must be one of {KV_SHIFT_TARGETS}, got {self.kv_shift_targets!r}")
        w = self.kv_shift_window
        if not isinstance(w, int) or isinstance(w, bool) or not 2 <= w <= MAX_KV_SHIFT_WINDOW:
            raise ValueError(f"kv_shift_window must be an int in [2, {MAX_KV_SHIFT_WINDOW}] (tokens seen, the "
                             f"current one included), got {w!r}")
        if self.kv_shift_granularity not in KV_SHIFT_GRANULARITIES:
            raise ValueError(f"kv_shift_granularity must be one of {KV_SHIFT_GRANULARITIES}, "
                             f"got {self.kv_shift_granularity!r}")
        for name in ("kv_shift_residual", "token_smear"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.kv_shift, (list, tuple)):
            if len(self.kv_shift) != self.num_hidden_layers:
                raise ValueError(
                    f"kv_shift list must have one bool per layer (num_hidden_layers = "
                    f"{self.num_hidden_layers}), got {len(self.kv_shift)} entries"
                )
            if not all(isinstance(v, bool) for v in self.kv_shift):
                raise ValueError(f"kv_shift list entries must be bools, got {self.kv_shift}")
        elif not isinstance(self.kv_shift, bool):
            raise ValueError(f"kv_shift must be a bool or a list of bools, got {self.kv_shift!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")

    def _check_swa_fields(self) -> None:
        for name in ("num_swa_attention_heads", "num_swa_key_value_heads", "swa_head_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")

    def _check_layers(self) -> None:
        types = self.layer_types
        if not isinstance(types, list) or len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must be a list with one entry per layer (num_hidden_layers = "
                             f"{self.num_hidden_layers}), got {types!r}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {bad[0]!r}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None; set "
                             "sliding_window (tokens a query sees)")
        if self.swa_head_dim % 2:
            raise ValueError(f"swa_head_dim must be even (RoPE rotates pairs), got {self.swa_head_dim}")
        heads, kv = self.layer_attention_heads(sliding=True)
        if heads % kv:
            raise ValueError(f"num_swa_key_value_heads ({kv}) must divide num_swa_attention_heads ({heads})")

    def layer_attention_heads(self, sliding: bool) -> tuple[int, int]:
        """``(query heads, KV heads)`` of the full (``sliding=False``) or sliding-window layers."""
        if not sliding:
            return self.num_attention_heads, self.num_key_value_heads
        heads = self.num_swa_attention_heads or self.num_attention_heads
        return heads, self.num_swa_key_value_heads or self.num_key_value_heads

    def layer_attention(self, layer_idx: int) -> LayerAttention:
        """Layer ``layer_idx``'s attention type, head counts, head size and window."""
        kind = self.layer_types[layer_idx]
        sliding = kind == "sliding_attention"
        heads, kv = self.layer_attention_heads(sliding)
        return LayerAttention(kind, heads, kv, self.swa_head_dim if sliding else self.head_dim,
                              self.sliding_window if sliding else None)

    @property
    def kv_shift_is_paper_form(self) -> bool:
        """Whether the shift is the paper's (K and V, window 2, per head, no residual): the fused kernels."""
        return (self.kv_shift_targets == "kv" and self.kv_shift_window == 2 and self.kv_shift_granularity == "head"
                and not self.kv_shift_residual)

    def layer_has_kv_shift(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses KV shifting."""
        if isinstance(self.kv_shift, (list, tuple)):
            return bool(self.kv_shift[layer_idx])
        return bool(self.kv_shift)
