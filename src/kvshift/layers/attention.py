"""KV-shifting self-attention (falls back to exactly vanilla attention when the layer's shift is off)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from ..ops.attention import attention_backend
from ..ops.kv_shift import kv_shift_rope, kv_shift_step_unchecked
from ..ops.rope import apply_rope
from .norm import RMSNorm

__all__ = ["KVShiftAttention", "init_shift_weight", "shift_generator", "is_shift_parameter"]


def is_shift_parameter(name: str) -> bool:
    """Whether a parameter name from ``named_parameters()`` is a KV-shift weight (for state dicts and
    wrapped models; on a live model prefer ``KVShiftAttention.shift_parameters()``)."""
    return name.rsplit(".", 1)[-1] in ("k_shift", "v_shift")


def init_shift_weight(num_heads: int, mode: str, parametrization: str = "free",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial raw ``[num_heads, 2]`` shift parameter, columns (current, previous)."""
    if mode == "identity":
        cur = torch.ones(num_heads, device="cpu")
    elif mode == "paper":  # current ~ U(0, 1), previous = 1 - current (paper §2.2)
        cur = torch.rand(num_heads, generator=generator, device="cpu")
    elif mode == "softmax":  # Baichuan-M1: softmax of a normal draw, also a convex pair
        cur = torch.softmax(torch.randn(num_heads, 2, generator=generator, device="cpu"), dim=-1)[:, 0]
    else:
        raise ValueError(f"kv_shift_init must be 'paper', 'identity' or 'softmax', got {mode!r}")
    w = torch.stack([cur, 1.0 - cur], dim=-1)
    if parametrization == "gate":  # stored as a logit in column 0; column 1 is unused
        w = torch.stack([torch.logit(cur.clamp(1e-6, 1 - 1e-6)), torch.zeros_like(cur)], dim=-1)
        if mode == "identity":
            w[:, 0] = 30.0  # sigmoid(30) == 1 in fp32
    return w


def shift_generator(layer_idx: int) -> torch.Generator:
    """A CPU generator for one layer's shift draws that leaves the global RNG untouched.

    Its seed is read from the global RNG's *current state* (peeked, not consumed) and the layer index, so
    the same seed gives the same draws, another seed other draws, and a model with KV shifting draws
    every shared weight exactly as the vanilla model does: the paired comparison starts from one init.
    """
    peek = torch.Generator()
    peek.set_state(torch.random.get_rng_state())
    base = int(torch.randint(0, 2**62, (1,), generator=peek, device="cpu"))
    return torch.Generator().manual_seed((base + 1_000_003 * (layer_idx + 1)) % 2**63)


class KVShiftAttention(nn.Module):
    """Multi-head / grouped-query causal attention with (optional) KV shifting.

    Parameters follow Hugging Face Llama (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``); a KV-shift
    layer adds ``k_shift`` and ``v_shift`` ``[num_key_value_heads, 2]`` = (current, previous).
    ``kv_shift_backend`` picks the shift kernel (see :func:`kvshift.kv_shift`): ``"auto"`` is the fused
    Triton kernel on CUDA and eager PyTorch elsewhere; set it per layer to force one.
    """

    kv_shift_backend: str = "auto"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        self.is_causal = True  # read by transformers' attention backends
        self.use_kv_shift = config.layer_has_kv_shift(layer_idx)
        self.shift_position = config.kv_shift_position
        self.parametrization = config.kv_shift_parametrization
        qkv_bias = config.attention_bias or config.qkv_bias
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=config.attention_bias)
        # per-head RMSNorm of queries and keys (Qwen3); on keys it acts after the shift, before RoPE
        qk_norm = getattr(config, "qk_norm", False)
        self.q_norm = RMSNorm(D, eps=config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(D, eps=config.rms_norm_eps) if qk_norm else None
        if self.use_kv_shift:
            self.k_shift = nn.Parameter(torch.empty(Hkv, 2))
            self.v_shift = nn.Parameter(torch.empty(Hkv, 2))
            self.reset_shift_parameters()

    def shift_parameters(self) -> list[nn.Parameter]:
        """The shift weights of this layer (empty when the shift is off): the one answer to "which
        parameters are shift weights", asked by the optimizer groups and the fp32 cast."""
        return [self.k_shift, self.v_shift] if self.use_kv_shift else []

    def reset_shift_parameters(self) -> None:
        """Draw ``k_shift`` / ``v_shift`` per ``config.kv_shift_init`` without consuming the global RNG.

        Through transformers' ``init.copy_``, which leaves weights that ``from_pretrained`` loaded alone.
        """
        if not self.use_kv_shift or self.k_shift.is_meta:  # meta: from_pretrained fills them later
            return
        g = shift_generator(self.layer_idx)
        for p in (self.k_shift, self.v_shift):
            w = init_shift_weight(self.num_kv_heads, self.config.kv_shift_init, self.parametrization, generator=g)
            init.copy_(p, w.to(p.device, p.dtype))

    def _effective(self, raw: torch.Tensor) -> torch.Tensor:
        if self.parametrization == "gate":
            cur = torch.sigmoid(raw[:, 0])
            return torch.stack([cur, 1.0 - cur], dim=-1)
        if self.parametrization == "clamp":
            return raw.clamp(0.0, 1.0)
        return raw

    def shift_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective ``(k_weight, v_weight)``, each ``[num_key_value_heads, 2]`` = (current, previous)."""
        if not self.use_kv_shift:
            return None
        return self._effective(self.k_shift), self._effective(self.v_shift)

    def _shift_kv(self, k, v, cos, sin, pad_mask, reset_mask, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted (and rotated) keys and values ``[B, Hkv, T, D]`` from raw ``[B, T, Hkv, D]`` ones."""
        T = k.shape[1]
        k_w, v_w = self.shift_weights()
        prev_k, prev_v = state.shift_last() if state is not None else (None, None)  # [B, 1, Hkv, D]
        if self.shift_position == "post_rope":
            k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
        raw_k, raw_v = k, v  # the raw (pre-shift) rows are the next chunk's predecessors
        if T == 1 and prev_k is not None:  # a decode step: a few small ops per tensor, branch-free
            k = kv_shift_step_unchecked(k, *k_w.unsqueeze(-1).unbind(1), prev_k, reset_mask)
            v = kv_shift_step_unchecked(v, *v_w.unsqueeze(-1).unbind(1), prev_v, reset_mask)
            if self.shift_position == "pre_rope":
                k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:  # one fused pass per tensor on CUDA (shift, RoPE for pre-RoPE keys, layout change)
            if prev_k is not None:
                prev_k, prev_v = prev_k[:, 0], prev_v[:, 0]
            masks = dict(attention_mask=pad_mask, reset_mask=reset_mask, backend=self.kv_shift_backend)
            norm_then_rope = self.shift_position == "pre_rope" and self.k_norm is not None
            rope = (cos, sin) if self.shift_position == "pre_rope" and not norm_then_rope else (None, None)
            k = kv_shift_rope(k, k_w, *rope, prev=prev_k, **masks)  # [B, Hkv, T, D]
            if norm_then_rope:  # QK-norm: shift, then normalise the mixed key, then rotate
                k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin).transpose(1, 2)
            v = kv_shift_rope(v, v_w, prev=prev_v, **masks)
        if state is not None:  # after the shift: a static cache overwrites the state in place
            state.push_shift_state(raw_k, raw_v, pad_mask)
        return k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        cache=None,
        pad_mask: torch.Tensor | None = None,
        reset_mask: torch.Tensor | None = None,
        shift_state=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output [B, T, hidden], attention weights or None)``; the shift is applied before any backend.

        ``attention_mask`` is whatever transformers' mask creation made for ``config._attn_implementation``
        (a 4-D mask, a FlexAttention ``BlockMask`` or None); ``shift_state``: this layer's decode state (raw
        previous k/v) when a cache is used; ``kwargs`` go to the attention backend (e.g. ``position_ids``).
        """
        B, T, _ = hidden_states.shape
        # heads by -1: under tensor parallelism a rank holds only its share of the heads
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        cos, sin = position_embeddings
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, H, T, D]
        if self.use_kv_shift:
            k, v = self._shift_kv(k, v, cos, sin, pad_mask, reset_mask, shift_state)
        else:
            k = self.k_norm(k) if self.k_norm is not None else k
            k, v = apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        backend = attention_backend(getattr(self.config, "_attn_implementation", None))
        out, weights = backend(
            self, q, k, v, attention_mask, scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            sliding_window=getattr(self.config, "sliding_window", None),  # read by flash-attention only
            **kwargs,
        )  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, -1)), weights
