"""kvshift's causal LM in MLX, for mlx-lm (``kvshift export mlx`` copies this file into the exported folder
and names it in ``config.json``'s ``model_file``; mlx-lm loads it with ``trust_remote_code=True``).

Standalone on purpose: it imports MLX and mlx-lm, never kvshift or PyTorch, so an exported folder runs on a
Mac with only ``pip install mlx-lm``. The weights are the Hugging Face model's, with each layer's K/V shift
stored as its effective (current, previous) weights ``[num_key_value_heads, 2]``.

The shift mixes every raw key and value row with the previous token's, before QK-norm and RoPE. A layer's
decode state is the raw K and V rows of the last token it has seen, kept beside its KV cache in mlx-lm's
cache (``CacheList(ArraysCache(2), KVCache())``), so prompts prefilled in several steps and cached
generation see the same predecessor as one full forward. Sequences start with a zero predecessor.

Sliding-window layers (``layer_types``) attend to their last ``sliding_window`` tokens with a
``RotatingKVCache`` and may have their own head counts (``num_swa_attention_heads``,
``num_swa_key_value_heads``, ``swa_head_dim``: Baichuan-M1's layout); their shift state is the same raw last
row, which does not leave with the window.

(No ``from __future__ import annotations`` here: mlx-lm executes this file without registering it as a
module, and ``dataclasses`` cannot resolve string annotations of such a module.)
"""

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    kv_shift: list[bool] = field(default_factory=list)
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention"; None: every layer full
    sliding_window: int | None = None
    num_swa_attention_heads: int | None = None
    num_swa_key_value_heads: int | None = None
    swa_head_dim: int | None = None

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, shift: bool, sliding: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        if sliding:  # a sliding-window layer's own shape
            self.n_heads = args.num_swa_attention_heads or self.n_heads
            self.n_kv_heads = args.num_swa_key_value_heads or self.n_kv_heads
            self.head_dim = args.swa_head_dim or self.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.shift = shift
        if shift:  # effective (current, previous) weights per KV head
            self.k_shift = mx.zeros((self.n_kv_heads, 2))
            self.v_shift = mx.zeros((self.n_kv_heads, 2))
        rope = dict(args.rope_parameters or {})
        scaling = None if rope.get("rope_type", "default") == "default" else rope
        self.rope = initialize_rope(self.head_dim, base=rope.get("rope_theta", args.rope_theta), traditional=False,
                                    scaling_config=scaling, max_position_embeddings=args.max_position_embeddings)

    @staticmethod
    def _shift(x: mx.array, weight: mx.array, prev: mx.array | None) -> mx.array:
        """``x`` ``[B, T, H, D]`` raw rows; ``prev`` ``[B, 1, H, D]`` the row before (None: zero)."""
        if prev is None:
            prev = mx.zeros_like(x[:, :1])
        before = mx.concatenate([prev, x[:, :-1]], axis=1)
        return x * weight[:, 0][:, None] + before * weight[:, 1][:, None]

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        kv_cache = cache
        if self.shift:
            state, kv_cache = (cache[0], cache[1]) if cache is not None else (None, None)
            prev_k = state[0] if state is not None else None
            prev_v = state[1] if state is not None else None
            raw_k, raw_v = k, v
            k = self._shift(k, self.k_shift, prev_k)
            v = self._shift(v, self.v_shift, prev_v)
            if state is not None:  # the raw last rows are the next step's predecessors
                state[0], state[1] = raw_k[:, -1:], raw_v[:, -1:]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        offset = kv_cache.offset if kv_cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if kv_cache is not None:
            k, v = kv_cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=kv_cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, shift: bool, sliding: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(args, shift, sliding)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class KVShiftModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.args = args
        self.layers = [DecoderLayer(args, shift, args.is_sliding(i)) for i, shift in enumerate(args.kv_shift)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        sliding = [self.args.is_sliding(i) for i in range(len(self.layers))]

        def kv_cache(kind: bool):  # the KV cache of the first layer of this kind (its mask serves them all)
            c = next((c for c, s in zip(cache, sliding) if s == kind), None)
            return c[1] if isinstance(c, CacheList) else c

        masks = {False: create_attention_mask(h, kv_cache(False)) if False in sliding else None,
                 True: create_attention_mask(h, kv_cache(True), window_size=self.args.sliding_window)
                 if True in sliding else None}
        for layer, c, s in zip(self.layers, cache, sliding):
            h = layer(h, masks[s], c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = KVShiftModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        """Per layer: the shift state (raw last K and V rows) and the KV cache (rotating over the window for a
        sliding-window layer), or the KV cache alone."""
        caches = []
        for i, shift in enumerate(self.args.kv_shift):
            kv = RotatingKVCache(max_size=self.args.sliding_window) if self.args.is_sliding(i) else KVCache()
            caches.append(CacheList(ArraysCache(size=2), kv) if shift else kv)
        return caches

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
