"""KV-shifting self-attention (falls back to exactly vanilla attention when the layer's shift is off)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from ..ops.attention import attention_backend
from ..ops.kv_shift import kv_shift_rope, kv_shift_rope_keep, kv_shift_step_unchecked
from ..ops.kv_shift.checks import previous_token_keep_mask
from ..ops.rope import apply_rope
from ..ops.short_conv import short_conv
from .norm import RMSNorm

__all__ = ["KVShiftAttention", "effective_shift_weights", "init_shift_weight", "init_conv_weight", "shift_generator", "is_shift_parameter"]

KV_SHIFT_INITS = ("paper", "identity", "softmax", "near-identity")
# "near-identity": current NEAR_IDENTITY_CURRENT, previous 1 - that; a retrofit start that already mixes in the
# previous token a little, so the previous-token weights do not start at exactly 0
NEAR_IDENTITY_CURRENT = 0.9
SHIFT_PARAMETER_NAMES = ("q_shift", "k_shift", "v_shift", "smear_gate", "smear_lambda")


def is_shift_parameter(name: str) -> bool:
    """Whether a parameter name from ``named_parameters()`` is a token-mixing weight (the KV-shift
    weights, their Q / wider / per-channel variants and the embedding smear): kept in fp32, never
    decayed. For state dicts and wrapped models; on a live model prefer ``shift_parameters()``."""
    return name.rsplit(".", 1)[-1] in SHIFT_PARAMETER_NAMES


def init_shift_weight(num_heads: int, mode: str, parametrization: str = "free",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial raw ``[num_heads, 2]`` shift parameter, columns (current, previous)."""
    if mode == "identity":
        cur = torch.ones(num_heads, device="cpu")
    elif mode == "paper":  # current ~ U(0, 1), previous = 1 - current (paper §2.2)
        cur = torch.rand(num_heads, generator=generator, device="cpu")
    elif mode == "softmax":  # Baichuan-M1: softmax of a normal draw, also a convex pair
        cur = torch.softmax(torch.randn(num_heads, 2, generator=generator, device="cpu"), dim=-1)[:, 0]
    elif mode == "near-identity":
        cur = torch.full((num_heads,), NEAR_IDENTITY_CURRENT, device="cpu")
    else:
        raise ValueError(f"kv_shift_init must be one of {KV_SHIFT_INITS}, got {mode!r}")
    w = torch.stack([cur, 1.0 - cur], dim=-1)
    if mode == "near-identity":  # 1 - 0.9 in Python, not fp32 (which gives 0.09999999)
        w = torch.tensor([[NEAR_IDENTITY_CURRENT, 1.0 - NEAR_IDENTITY_CURRENT]]).repeat(num_heads, 1)
    if parametrization == "gate":  # stored as a logit in column 0; column 1 is unused
        w = torch.stack([torch.logit(cur.clamp(1e-6, 1 - 1e-6)), torch.zeros_like(cur)], dim=-1)
        if mode == "identity":
            w[:, 0] = 30.0  # sigmoid(30) == 1 in fp32
    return w


def init_conv_weight(shape: tuple[int, ...], mode: str, parametrization: str = "free", residual: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial raw weight of a short convolution, ``shape`` = ``[heads, window]`` or ``[heads, D, window]``
    (column 0: the current token).

    ``"paper"`` is the paper's rule for its wider-window ablation (§4.7): the current and the next
    ``w - 2`` taps ~ U(0, 1), the oldest one ``1 -`` their sum (the weights sum to 1, the oldest may be
    negative; for window 2 exactly :func:`init_shift_weight`'s pair, the same numbers from the same
    generator); ``"identity"`` is the current token alone, ``"softmax"`` a softmax of a normal draw. The
    ``"gate"`` parametrisation (a softmax over the window) starts from a point uniform on the simplex.
    With ``residual`` (``x + conv(x)``), ``"paper"`` draws U(-1/sqrt(w), 1/sqrt(w)) and ``"identity"`` is
    zero.
    """
    W = shape[-1]
    if mode not in KV_SHIFT_INITS:
        raise ValueError(f"kv_shift_init must be one of {KV_SHIFT_INITS}, got {mode!r}")
    if mode == "near-identity" and not (len(shape) == 2 and W == 2 and not residual):
        raise ValueError("kv_shift_init='near-identity' is defined for the paper's shift only (window 2, one "
                         "weight pair per head, no residual)")
    if residual:
        if mode == "identity":
            return torch.zeros(shape)
        if mode == "paper":
            return (torch.rand(shape, generator=generator) * 2 - 1) / W**0.5
        return torch.softmax(torch.randn(shape, generator=generator), dim=-1)
    if len(shape) == 2 and W == 2:
        return init_shift_weight(shape[0], mode, parametrization, generator=generator)
    if parametrization == "gate":  # softmax over the window of stored logits: a convex start
        if mode == "identity":
            w = torch.zeros(shape)
            w[..., 0] = 30.0
            return w
        if W == 2:  # stored as init_shift_weight does: the logit of the current weight, then 0
            cur = torch.rand(shape[:-1], generator=generator) if mode == "paper" else \
                torch.softmax(torch.randn(*shape[:-1], 2, generator=generator), dim=-1)[..., 0]
            return torch.stack([torch.logit(cur.clamp(1e-6, 1 - 1e-6)), torch.zeros_like(cur)], dim=-1)
        if mode == "paper":  # normalised exponentials: uniform on the simplex (Dirichlet(1, ..., 1))
            e = -torch.log1p(-torch.rand(shape, generator=generator))
            return torch.log((e / e.sum(-1, keepdim=True)).clamp_min(1e-12))
        return torch.randn(shape, generator=generator)
    if mode == "identity":
        w = torch.zeros(shape)
        w[..., 0] = 1.0
    elif mode == "paper":  # paper §4.7: the first w - 1 taps ~ U(0, 1), the last one 1 - their sum
        head = torch.rand(*shape[:-1], W - 1, generator=generator)
        w = torch.cat([head, 1.0 - head.sum(-1, keepdim=True)], dim=-1)
    else:
        w = torch.softmax(torch.randn(shape, generator=generator), dim=-1)
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


def effective_shift_weights(raw: torch.Tensor, parametrization: str) -> torch.Tensor:
    """Effective mixing weights (last dim: current token, then lags 1, 2, ...) from stored ones:
    ``free`` as stored, ``gate`` a sigmoid pair (window 2) or a softmax over the window, ``clamp`` to
    [0, 1]. The one definition, shared by the model and the vLLM model."""
    if parametrization == "gate":
        if raw.shape[-1] > 2:
            return torch.softmax(raw, dim=-1)
        cur = torch.sigmoid(raw[..., 0])
        return torch.stack([cur, 1.0 - cur], dim=-1)
    if parametrization == "clamp":
        return raw.clamp(0.0, 1.0)
    return raw


class KVShiftAttention(nn.Module):
    """Multi-head / grouped-query causal attention with (optional) KV shifting.

    Parameters follow Hugging Face Llama (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``); a KV-shift
    layer adds ``k_shift`` and ``v_shift`` ``[num_key_value_heads, 2]`` = (current, previous), or, for the
    lab's variants (``kv_shift_targets`` / ``_window`` / ``_granularity`` / ``_residual``), ``{q,k,v}_shift``
    ``[heads, window]`` / ``[heads, head_dim, window]`` applied by :func:`kvshift.ops.short_conv`.
    ``kv_shift_backend`` picks the shift kernel (see :func:`kvshift.kv_shift`): ``"auto"`` is the fused
    Triton kernel on CUDA and eager PyTorch elsewhere; set it per layer to force one.
    """

    kv_shift_backend: str = "auto"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # this layer's shape: sliding-window layers may have their own head counts (Baichuan-M1)
        shape = config.layer_attention(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.sliding_window = shape.sliding_window
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.attention_dropout = config.attention_dropout
        self.is_causal = True  # read by transformers' attention backends
        self.use_kv_shift = config.layer_has_kv_shift(layer_idx)
        self.shift_position = config.kv_shift_position
        self.parametrization = config.kv_shift_parametrization
        # the paper's form runs the fused kv_shift kernels; any other mixer the PyTorch short convolution
        self.paper_form = getattr(config, "kv_shift_is_paper_form", True)
        self.window = getattr(config, "kv_shift_window", 2)
        self.per_channel = getattr(config, "kv_shift_granularity", "head") == "channel"
        self.residual = getattr(config, "kv_shift_residual", False)
        targets = getattr(config, "kv_shift_targets", "kv")
        self.mix_targets = tuple(t for t in "kvq" if t in targets) if self.use_kv_shift else ()
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
        for t in self.mix_targets:  # torch.empty: no draw from the global RNG (the paired init)
            setattr(self, f"{t}_shift", nn.Parameter(torch.empty(self._mix_shape(t))))
        self.reset_shift_parameters()

    def _mix_shape(self, target: str) -> tuple[int, ...]:
        heads = self.num_heads if target == "q" else self.num_kv_heads
        return (heads, self.head_dim, self.window) if self.per_channel else (heads, self.window)

    def shift_parameters(self) -> list[nn.Parameter]:
        """The shift weights of this layer (empty when the shift is off): the one answer to "which
        parameters are shift weights", asked by the optimizer groups and the fp32 cast."""
        return [getattr(self, f"{t}_shift") for t in self.mix_targets]

    def reset_shift_parameters(self) -> None:
        """Draw ``k_shift`` / ``v_shift`` per ``config.kv_shift_init`` without consuming the global RNG.

        Through transformers' ``init.copy_``, which leaves weights that ``from_pretrained`` loaded alone.
        """
        params = self.shift_parameters()
        if not params or params[0].is_meta:  # meta: from_pretrained fills them later
            return
        g = shift_generator(self.layer_idx)  # drawn in the order k, v, q: K-only and KV share K's draw
        for t, p in zip(self.mix_targets, params):
            w = init_conv_weight(self._mix_shape(t), self.config.kv_shift_init, self.parametrization,
                                 self.residual, generator=g)
            init.copy_(p, w.to(p.device, p.dtype))

    def _effective(self, raw: torch.Tensor) -> torch.Tensor:
        return effective_shift_weights(raw, self.parametrization)

    def mix_weights(self) -> dict[str, torch.Tensor]:
        """Effective weights ``{"k": ..., "v": ..., "q": ...}`` of the mixed projections, each
        ``[heads, window]`` or ``[heads, head_dim, window]`` (column 0: the current token)."""
        return {t: self._effective(getattr(self, f"{t}_shift")) for t in self.mix_targets}

    def shift_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective ``(k_weight, v_weight)``, each ``[num_key_value_heads, 2]`` = (current, previous), for
        the paper's form; None when the layer has no shift or another mixer (see :meth:`mix_weights`)."""
        if not self.use_kv_shift or not self.paper_form:
            return None
        return self._effective(self.k_shift), self._effective(self.v_shift)

    def mix(self, target: str, x: torch.Tensor, *, prev=None, pad_mask=None, reset_mask=None) -> torch.Tensor:
        """The mixer of one projection (``"q"``, ``"k"`` or ``"v"``) on raw rows ``[B, T, heads, D]``; the
        identity for a projection this layer does not mix. ``prev``: the ``window - 1`` raw rows before."""
        if target not in self.mix_targets:
            return x
        w = self._effective(getattr(self, f"{target}_shift"))
        if self.paper_form:
            return kv_shift_rope(x, w, prev=None if prev is None else prev[:, -1], attention_mask=pad_mask,
                                 reset_mask=reset_mask, backend=self.kv_shift_backend).transpose(1, 2)
        y = short_conv(x, w, attention_mask=pad_mask, prev=prev, reset_mask=reset_mask)
        return x + y if self.residual else y

    def _conv_qkv(self, q, k, v, cos, sin, pad_mask, reset_mask, state):
        """Queries, keys and values ``[B, heads, T, D]`` through a general mixer (not the paper's form)."""
        post = self.shift_position == "post_rope"
        if post:
            q = apply_rope(self.q_norm(q) if self.q_norm is not None else q, cos, sin)
            k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
        raw = {"q": q, "k": k, "v": v}
        out = {t: self.mix(t, raw[t], prev=state.conv_rows(t) if state is not None else None,
                           pad_mask=pad_mask, reset_mask=reset_mask) for t in self.mix_targets}
        if state is not None:
            state.push_conv_rows({t: raw[t] for t in self.mix_targets}, self.window - 1, pad_mask, reset_mask)
        q, k, v = (out.get(t, raw[t]) for t in "qkv")
        if not post:
            q = apply_rope(self.q_norm(q) if self.q_norm is not None else q, cos, sin)
            k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _decode_columns(self, k_w: torch.Tensor, v_w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``[H, 1]`` (current, previous) columns of the effective K and V weights for a decode step.

        Without autograd and outside compile they are kept between steps, keyed on the parameters'
        versions and storage (any in-place update, load or move makes new ones): their four view ops
        were a measurable share of an eager CPU decode step.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return (*k_w.unsqueeze(-1).unbind(1), *v_w.unsqueeze(-1).unbind(1))
        ks, vs = self.k_shift, self.v_shift
        key = (ks._version, vs._version, ks.data_ptr(), vs.data_ptr(), ks.device, ks.dtype)
        cached = self.__dict__.get("_decode_cols")
        if cached is None or cached[0] != key:
            cached = (key, (*k_w.unsqueeze(-1).unbind(1), *v_w.unsqueeze(-1).unbind(1)))
            self.__dict__["_decode_cols"] = cached
        return cached[1]

    def _shift_kv(self, k, v, cos, sin, pad_mask, reset_mask, state,
                  keep=None, has_keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted (and rotated) keys and values ``[B, Hkv, T, D]`` from raw ``[B, T, Hkv, D]`` ones.

        ``keep`` (when ``has_keep``): the forward's keep mask, built once for every layer from ``pad_mask``
        and ``reset_mask`` (``previous_token_keep_mask(..., has_prev=True)``); else built here, once for K and V.
        """
        T = k.shape[1]
        k_w, v_w = self.shift_weights()
        prev_k, prev_v = state.shift_last() if state is not None else (None, None)  # [B, 1, Hkv, D]
        if self.shift_position == "post_rope":
            k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
        raw_k, raw_v = k, v  # the raw (pre-shift) rows are the next chunk's predecessors
        if T == 1 and prev_k is not None:  # a decode step: a few small ops per tensor, branch-free
            k_cur, k_prev, v_cur, v_prev = self._decode_columns(k_w, v_w)
            k = kv_shift_step_unchecked(k, k_cur, k_prev, prev_k, reset_mask)
            v = kv_shift_step_unchecked(v, v_cur, v_prev, prev_v, reset_mask)
            if self.shift_position == "pre_rope":
                k = apply_rope(self.k_norm(k) if self.k_norm is not None else k, cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:  # one fused pass per tensor on CUDA (shift, RoPE for pre-RoPE keys, layout change)
            if prev_k is not None:
                prev_k, prev_v = prev_k[:, 0], prev_v[:, 0]
            norm_then_rope = self.shift_position == "pre_rope" and self.k_norm is not None
            rope = (cos, sin) if self.shift_position == "pre_rope" and not norm_then_rope else (None, None)
            if self.kv_shift_backend == "reference":  # the literal definition, from the masks themselves
                masks = dict(attention_mask=pad_mask, reset_mask=reset_mask, backend="reference")
                k = kv_shift_rope(k, k_w, *rope, prev=prev_k, **masks)  # [B, Hkv, T, D]
                v = kv_shift_rope(v, v_w, prev=prev_v, **masks)
            else:  # one keep mask for K and V (and, from the model, for every layer)
                if not has_keep:
                    keep = previous_token_keep_mask(k.shape[0], T, k.device, attention_mask=pad_mask,
                                                    has_prev=True, reset_mask=reset_mask)
                k = kv_shift_rope_keep(k, k_w, *rope, keep=keep, prev=prev_k, backend=self.kv_shift_backend)
                v = kv_shift_rope_keep(v, v_w, keep=keep, prev=prev_v, backend=self.kv_shift_backend)
            if norm_then_rope:  # QK-norm: shift, then normalise the mixed key, then rotate
                k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin).transpose(1, 2)
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
        keep_mask: tuple[torch.Tensor | None] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output [B, T, hidden], attention weights or None)``; the shift is applied before any backend.

        ``attention_mask`` is whatever transformers' mask creation made for ``config._attn_implementation``
        (a 4-D mask, a FlexAttention ``BlockMask`` or None); ``shift_state``: this layer's decode state (raw
        previous k/v) when a cache is used; ``keep_mask``: ``(keep,)``, the forward's
        ``previous_token_keep_mask(pad_mask, reset_mask)`` built once for every layer (None: built here);
        ``kwargs`` go to the attention backend (e.g. ``position_ids``).
        """
        B, T, _ = hidden_states.shape
        # heads by -1: under tensor parallelism a rank holds only its share of the heads
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        cos, sin = position_embeddings
        if self.use_kv_shift and not self.paper_form:
            q, k, v = self._conv_qkv(q, k, v, cos, sin, pad_mask, reset_mask, shift_state)
        elif self.use_kv_shift:
            q = apply_rope(self.q_norm(q) if self.q_norm is not None else q, cos, sin).transpose(1, 2)
            k, v = self._shift_kv(k, v, cos, sin, pad_mask, reset_mask, shift_state,
                                  keep=keep_mask[0] if keep_mask is not None else None,
                                  has_keep=keep_mask is not None)
        else:
            q = apply_rope(self.q_norm(q) if self.q_norm is not None else q, cos, sin).transpose(1, 2)
            k = self.k_norm(k) if self.k_norm is not None else k
            k, v = apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        # One dtype for q, k and v, v's (the projection's: bf16 under autocast). RoPE with fp32 cos/sin
        # promotes q and k to fp32 on some paths and not on others (the fused kernel returns x's dtype), which
        # would give a cache whose keys change dtype between prefill and decode and fp32 queries to
        # FlexAttention (slow or rejected on older torch)
        if q.dtype != v.dtype:
            q = q.to(v.dtype)
        if k.dtype != v.dtype:
            k = k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        backend = attention_backend(getattr(self.config, "_attn_implementation", None))
        out, weights = backend(
            self, q, k, v, attention_mask, scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            sliding_window=self.sliding_window,  # read by flash-attention only (the masks carry it otherwise)
            **kwargs,
        )  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, -1)), weights
