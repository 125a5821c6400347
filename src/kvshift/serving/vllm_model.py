"""kvshift's causal LM as a vLLM model (out of tree; registered by :func:`kvshift.serving.vllm.register`).

The K/V shift of a layer is what vLLM runs for its short-convolution models (LFM2's ``ShortConv``): a
depthwise causal convolution of width ``kv_shift_window`` over the layer's raw ``[K | V]`` channels, each
KV head's weights repeated over its channels (or one weight per channel), run before QK-norm, RoPE and
vLLM's ``Attention``. It goes through vLLM's ``causal_conv1d_fn`` / ``causal_conv1d_update`` (their
native paths on CPU), state layout, metadata builder and state copies, with a per-request state: the
raw rows of the last ``window - 1`` tokens a request has seen (plus one row per speculative token). So it
holds across continuous batching, chunked prefill (a later chunk starts from the state the earlier one
left), preemption (a recomputed request starts from a zero state), prefix caching ('align' mode),
n-gram speculative decoding (the state is rolled back to the last accepted token) and tensor parallelism
(the shift weights and state channels go with their KV heads).

Supported: the paper's shift with any parametrization (``free`` / ``gate`` / ``clamp``, turned into
effective weights once, at load), windows 2-4, per-head or per-channel weights, the residual form,
per-layer ``kv_shift`` lists, MHA and GQA, QK-norm, biases, tied embeddings and transformers' RoPE types
that vLLM knows. Anything else is refused at load, naming the config field or engine setting.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import CacheConfig, ModelConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaMLP
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..layers.attention import effective_shift_weights

__all__ = ["KVShiftForCausalLM", "KVShiftState", "check_engine_config", "check_servable", "kv_head_shard", "shift_decode_speculative"]

SERVED_WINDOWS = (2, 3, 4)  # tokens each mixed row sees (the current one included): vLLM's conv kernels' widths


def check_servable(config) -> None:
    """Raise ``ValueError`` naming the config field when vLLM cannot serve this kvshift config."""
    wants = {
        "kv_shift_targets": (("kv",), "a mixer of K and V only"),
        "kv_shift_window": (SERVED_WINDOWS, "windows of 2 to 4 tokens"),
        "kv_shift_granularity": (("head", "channel"), "per-head or per-channel weights"),
        "kv_shift_position": (("pre_rope",), "the mixer before RoPE"),
        "token_smear": ((False,), "no token smear"),
        "hidden_act": (("silu",), "a SwiGLU MLP"),
    }
    for field, (values, what) in wants.items():
        got = getattr(config, field, values[0])
        if got not in values:
            allowed = values[0] if len(values) == 1 else " / ".join(map(repr, values))
            raise ValueError(f"kvshift's vLLM model serves {what} ({field}={allowed!r}); this checkpoint has "
                             f"{field}={got!r}. Serve it with Hugging Face (kvshift generate) instead.")


def _check_head_dim(config) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; say so at load, naming the field."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    for i in range(config.num_hidden_layers):
        shape = config.layer_attention(i)
        if shape.head_dim not in sizes:
            field = _head_field(config, shape, "head_dim")
            heads = "num_swa_attention_heads" if field == "swa_head_dim" else "num_attention_heads"
            raise ValueError(f"vLLM's CPU attention supports head sizes in {sizes}; this checkpoint has "
                             f"{field}={shape.head_dim} (hidden_size / {heads} unless set)")


def _head_field(config, shape, field: str) -> str:
    """The config field a layer's ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` comes from:
    a sliding-window layer's own field (``num_swa_...``, ``swa_head_dim``) where the config sets one that differs."""
    swa = {"num_attention_heads": "num_swa_attention_heads", "num_key_value_heads": "num_swa_key_value_heads",
           "head_dim": "swa_head_dim"}[field]
    if shape.sliding_window and getattr(config, swa, None) not in (None, getattr(config, field)):
        return swa
    return field


def check_engine_config(vllm_config) -> None:
    """Raise ``ValueError`` for engine settings kvshift's vLLM model cannot run, naming the setting.

    Speculation with a draft network (a draft model, EAGLE, MTP) is refused: vLLM 0.32's draft proposer
    addresses the draft's KV cache with the block table of the target's first KV cache group. A kvshift
    model has several groups (its attention layers, its shift states) sharing one memory pool, so the
    draft wrote over the target's keys and values (with a one-layer target and a close draft, 16 of 16
    prompts decoded other tokens than Hugging Face). N-gram speculation has no draft network.

    vLLM's CPU build runs speculative decoding for short-convolution models only without prefix caching:
    with both, its state-cache 'align' mode calls a Triton kernel the CPU build does not have, and the
    engine dies at the first request."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or not vllm_config.num_speculative_tokens:
        return
    if spec.method != "ngram":
        raise ValueError(
            f"kvshift's vLLM model supports n-gram speculation (speculative_config method 'ngram'), not "
            f"method={spec.method!r}: vLLM 0.32 builds a draft network's attention metadata from the target's first "
            f"KV cache group, and a hybrid model (attention + shift state) keeps its layers in several groups that "
            f"share memory, so the draft's keys and values would overwrite the target's")
    if current_platform.is_cpu() and vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("speculative decoding of a kvshift model on vLLM's CPU build needs prefix caching off: "
                         "pass --no-enable-prefix-caching (vllm serve) or enable_prefix_caching=False (vllm.LLM)")


def _shift_layers(config) -> list[bool]:
    """Which layers carry a shift state. vLLM sizes a hybrid model's state cache from at least one such
    layer, so a checkpoint with the shift off everywhere gets an identity mixer (weights 1, 0: exactly
    vanilla attention) in layer 0."""
    flags = [bool(config.layer_has_kv_shift(i)) for i in range(config.num_hidden_layers)]
    return flags if any(flags) else [True] + [False] * (len(flags) - 1)


def _state_window(config) -> int:
    """The convolution width of every state layer: the checkpoint's window, or 2 for the identity mixer of
    a checkpoint with the shift off everywhere (vLLM keeps all state layers of a model in one shape)."""
    any_shift = any(config.layer_has_kv_shift(i) for i in range(config.num_hidden_layers))
    return config.kv_shift_window if any_shift else 2


def kv_head_shard(total_kv_heads: int, tp_size: int, tp_rank: int,
                  field: str = "num_key_value_heads") -> tuple[int, int]:
    """``(first, count)``: the KV heads one tensor-parallel rank holds, as vLLM's ``QKVParallelLinear``
    shards them: ``total / tp`` heads each when there are at least as many KV heads as ranks, else one
    head, replicated over ``tp / total`` consecutive ranks. The shift weights of a head go with it.
    ``field``: the config field the count comes from, named in errors."""
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise ValueError(f"{field}={total_kv_heads} must be divisible by tensor_parallel_size={tp_size}")
        count = total_kv_heads // tp_size
        return tp_rank * count, count
    if tp_size % total_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} must be a multiple of {field}={total_kv_heads}")
    return tp_rank // (tp_size // total_kv_heads), 1


def _layer_state_width(config, layer_idx: int, tp_size: int = 1) -> int:
    """Channels of one rank's shift state in layer ``layer_idx``: its raw K row and its raw V row."""
    shape = config.layer_attention(layer_idx)
    _, heads = kv_head_shard(shape.num_kv_heads, tp_size, 0, _head_field(config, shape, "num_key_value_heads"))
    return 2 * heads * shape.head_dim


def _state_width(config, tp_size: int = 1) -> int:
    """Channels of every state layer's cache: the widest layer's. vLLM gives all state layers of a model one
    shape, so layers with fewer K|V channels (sliding-window layers with their own head counts) pad theirs."""
    return max(_layer_state_width(config, i, tp_size) for i, on in enumerate(_shift_layers(config)) if on)


def _state_shape(width: int, window: int, num_spec: int) -> tuple[tuple[int, int]]:
    """vLLM's short-conv state shape for ``width`` channels of this rank (already sharded): the last
    ``window - 1`` raw rows, plus one row per speculative token so that a verify step can be rolled back."""
    return MambaStateShapeCalculator.short_conv_state_shape(tp_world_size=1, intermediate_size=width,
                                                            conv_kernel=window, num_spec=num_spec)


def shift_decode_speculative(rows: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor,
                             num_accepted: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """The mixer on the decode rows of a speculative (verify) step, with vLLM's short-conv state rollback,
    in PyTorch (vLLM's CPU build has no speculative ``causal_conv1d_update``; its Triton kernel does the
    same on GPUs).

    ``rows`` ``[tokens, width]``: request ``i``'s tokens are ``rows[query_start_loc[i]:query_start_loc[i+1]]``
    (its last sampled token, then its draft tokens). ``weight`` ``[width, W]``: per channel, the weight of
    lag ``W - 1`` first and of the current token last (a convolution's order). ``state``
    ``[slots, width, W - 1 + num_spec]``: a request's ``W - 1`` predecessors start at column
    ``num_accepted[i] - 1`` of its slot (the window that ends at the last token the previous step
    accepted). This step leaves the ``W - 2`` rows that followed that start in columns ``0 .. W - 3`` and
    its own raw rows after them, so the next step finds its window the same way."""
    window = weight.shape[1]
    lags = window - 1
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    request = torch.repeat_interleave(torch.arange(len(lengths), device=rows.device), lengths)
    n = request.numel()
    rows = rows[:n]
    column = torch.arange(n, device=rows.device) - query_start_loc[:-1][request]
    slots = slots.long()
    start = (num_accepted - 1).long()
    history = state[slots[:, None], :, start[:, None] + torch.arange(lags, device=rows.device)]  # [req, lags, width]
    history = history.to(rows.dtype)
    out = rows * weight[:, lags]
    for lag in range(1, window):
        prev = torch.empty_like(rows)
        prev[lag:] = rows[:-lag] if lag < n else rows[:0]
        early = column < lag  # the predecessor is in the history, not in this step's rows
        prev[early] = history[request[early], lags - lag + column[early]]
        out = torch.addcmul(out, prev, weight[:, lags - lag])
    if lags > 1:  # keep the window's tail, then this step's rows
        state[slots[:, None], :, torch.arange(lags - 1, device=rows.device)] = history[:, 1:].to(state.dtype)
    state[slots[request], :, lags - 1 + column] = rows.to(state.dtype)
    return out


class KVShiftState(MambaBase, nn.Module):
    """The shift (or window-3/4 mixer) of one layer's raw ``[tokens, K | V]`` rows, with the per-request
    state, written through vLLM's short-convolution machinery: a depthwise causal convolution over the K|V
    channels, the state layout, metadata builder and state copy of vLLM's ``ShortConv`` (LFM2).

    ``weight`` ``[K|V channels, window]`` holds the effective weights of every channel of this rank (a KV
    head's weights repeated over its ``head_dim`` channels, unless they are per channel), oldest lag first
    and the current token last, as a convolution orders them; the state of a request is its last
    ``window - 1`` raw rows (plus one row per speculative token).
    """

    def __init__(self, width: int, window: int, model_config: ModelConfig | None, cache_config: CacheConfig | None,
                 prefix: str, used: int | None = None) -> None:
        super().__init__()
        self.width, self.window = width, window
        # this layer's K|V channels; the state (and weight) may be wider: vLLM gives every state layer the
        # widest one's shape, and the extra channels stay zero
        self.used = width if used is None else used
        self.prefix = prefix
        self.model_config, self.cache_config = model_config, cache_config
        vllm_config = get_current_vllm_config()
        self.num_spec = vllm_config.num_speculative_tokens or 0
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name: {prefix}")
        context[prefix] = self  # vLLM finds the state layers (and binds their cache) through this table
        self.kv_cache = (torch.tensor([]),)
        self.register_buffer("weight", torch.zeros(width, window), persistent=False)

    # -- what vLLM's state cache needs to know -------------------------------------------------------
    def get_state_shape(self):
        return _state_shape(self.width, self.window, self.num_spec)

    def get_state_dtype(self):
        return MambaStateDtypeCalculator.short_conv_state_dtype(self.model_config.dtype,
                                                                self.cache_config.mamba_cache_dtype)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV  # its metadata (state slots, prefill starts) is ours

    # -- the shift ---------------------------------------------------------------------------------
    def _states(self) -> torch.Tensor:
        """``[slots, width, state_len]``: the state cache in the convolution kernels' (dim-first) view."""
        state = self.kv_cache[0]
        return state if is_conv_state_dim_first() else state.transpose(-1, -2)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Shifted ``[tokens, width]`` rows. vLLM's flat batch holds the decode tokens first (one per
        request, or the last token plus the drafts of a speculative step), then the prefill tokens of each
        request in order; padding rows at the end are left unshifted."""
        if self.used < self.width:
            return self._forward(torch.nn.functional.pad(rows, (0, self.width - self.used)))[:, :self.used]
        return self._forward(rows)

    def _forward(self, rows: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is None:  # the profile run: no requests, no state
            return rows * self.weight[:, -1].to(rows.dtype)
        state = self._states()
        weight = self.weight.to(state.dtype)
        n_dec, n_pre = meta.num_decode_tokens, meta.num_prefill_tokens
        out = rows.clone()
        if current_platform.is_cpu():
            self._forward_cpu(rows, out, state, weight, meta, n_dec, n_pre)
        else:
            self._forward_triton(rows, out, state, weight, meta, n_dec, n_pre)
        return out

    def _forward_cpu(self, rows, out, state, weight, meta, n_dec, n_pre) -> None:
        from vllm.model_executor.layers.mamba.ops.cpu.causal_conv1d import (
            causal_conv1d_fn_cpu,
            causal_conv1d_update_cpu,
            causal_conv1d_update_torch,
        )
        from vllm.platforms import CpuArchEnum

        if n_pre:
            x = rows[n_dec:n_dec + n_pre].transpose(0, 1)  # [width, prefill tokens]
            out[n_dec:n_dec + n_pre] = causal_conv1d_fn_cpu(
                x, weight, None, state, meta.query_start_loc_p, meta.state_indices_tensor_p.flatten(),
                meta.has_initial_states_p, activation=None).transpose(0, 1)
        if not n_dec:
            return
        if meta.num_accepted_tokens is not None:  # a speculative verify step
            out[:n_dec] = shift_decode_speculative(rows[:n_dec], state, weight, meta.state_indices_tensor_d[:, 0],
                                                   meta.num_accepted_tokens, meta.query_start_loc_d)
            return
        slots = meta.state_indices_tensor_d.flatten()
        x = rows[:n_dec].contiguous()
        if current_platform.get_cpu_architecture() == CpuArchEnum.ARM:
            view = state[slots].contiguous()
            out[:n_dec] = causal_conv1d_update_torch(x.unsqueeze(-1), view, weight, None, activation=None).squeeze(-1)
            state[slots] = view
        else:
            out[:n_dec] = causal_conv1d_update_cpu(x, state, weight, None, activation=None, conv_state_indices=slots)

    def _forward_triton(self, rows, out, state, weight, meta, n_dec, n_pre) -> None:
        from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

        if n_pre:
            x = rows[n_dec:n_dec + n_pre].transpose(0, 1)  # [width, tokens], channels contiguous
            out[n_dec:n_dec + n_pre] = causal_conv1d_fn(
                x, weight, None, activation=None, conv_states=state, has_initial_state=meta.has_initial_states_p,
                cache_indices=meta.state_indices_tensor_p, metadata=meta,
                query_start_loc=meta.query_start_loc_p).transpose(0, 1)[:n_pre]
        if not n_dec:
            return
        x = rows[:n_dec].contiguous()
        if meta.num_accepted_tokens is not None:
            out[:n_dec] = causal_conv1d_update(
                x, state, weight, None, activation=None, conv_state_indices=meta.state_indices_tensor_d,
                num_accepted_tokens=meta.num_accepted_tokens, query_start_loc=meta.query_start_loc_d,
                max_query_len=meta.state_indices_tensor_d.size(-1))
        else:
            out[:n_dec] = causal_conv1d_update(x, state, weight, None, activation=None,
                                               conv_state_indices=meta.state_indices_tensor_d)


class KVShiftAttention(nn.Module):
    def __init__(self, config, layer_idx: int, shift: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        shape = config.layer_attention(layer_idx)  # sliding-window layers may have their own head counts
        if shape.num_heads % tp:
            raise ValueError(f"{_head_field(config, shape, 'num_attention_heads')}={shape.num_heads} must be "
                             f"divisible by tensor_parallel_size={tp}")
        self.num_heads = shape.num_heads // tp  # this rank's query heads
        self.first_kv_head, self.num_kv_heads = kv_head_shard(shape.num_kv_heads, tp, get_tensor_model_parallel_rank(),
                                                              _head_field(config, shape, "num_key_value_heads"))
        self.head_dim = shape.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(config.attention_bias or config.qkv_bias)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, shape.num_heads,
                                          shape.num_kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(shape.num_heads * self.head_dim, config.hidden_size,
                                        bias=bool(config.attention_bias), prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, per_layer_sliding_window=shape.sliding_window,
                              prefix=f"{prefix}.attn")
        self.parametrization = config.kv_shift_parametrization
        self.window = config.kv_shift_window
        self.per_channel = config.kv_shift_granularity == "channel"
        self.residual = bool(config.kv_shift_residual)
        self.has_checkpoint_shift = bool(config.layer_has_kv_shift(layer_idx))
        self.shift = (KVShiftState(_state_width(config, tp), _state_window(config), vllm_config.model_config,
                                   vllm_config.cache_config, prefix=f"{prefix}.kv_shift", used=2 * self.kv_size)
                      if shift else None)
        if self.has_checkpoint_shift:  # raw weights as saved, per KV head of this rank: (current, lag 1, ...)
            shape = (self.num_kv_heads, self.head_dim, self.window) if self.per_channel else (self.num_kv_heads,
                                                                                                self.window)
            self.k_shift = nn.Parameter(torch.zeros(shape), requires_grad=False)
            self.v_shift = nn.Parameter(torch.zeros(shape), requires_grad=False)
            for param in (self.k_shift, self.v_shift):
                param.weight_loader = self._load_shift
        elif self.shift is not None:  # the identity mixer of a model with the shift off everywhere
            self.shift.weight[:self.shift.used, -1].fill_(1.0)

    def _load_shift(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Take this rank's KV heads out of a checkpoint's ``[num_key_value_heads, 2]`` shift weights."""
        rows = loaded[self.first_kv_head:self.first_kv_head + self.num_kv_heads]
        if rows.shape != param.shape:
            raise ValueError(f"shift weight of shape {tuple(loaded.shape)} does not hold KV heads "
                             f"{self.first_kv_head}..{self.first_kv_head + self.num_kv_heads - 1}")
        param.data.copy_(rows)

    @torch.no_grad()
    def finish_loading(self) -> None:
        """Turn the loaded shift parameters into this rank's per-channel convolution weights
        ``[K channels | V channels, window]`` (oldest lag first), with the Hugging Face layer's
        parametrization; a residual mixer (``x + conv(x)``) adds one to the current token's weight."""
        if not self.has_checkpoint_shift:
            return
        cols = []
        for raw in (self.k_shift, self.v_shift):
            w = effective_shift_weights(raw.float(), self.parametrization)  # [..., window], current first
            w = w.reshape(-1, self.window) if self.per_channel else w.repeat_interleave(self.head_dim, dim=0)
            cols.append(w.flip(-1))
        weight = torch.cat(cols, dim=0)
        if self.residual:
            weight[:, -1] += 1.0
        self.shift.weight[:weight.shape[0]].copy_(weight)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, kv = qkv.split([self.q_size, 2 * self.kv_size], dim=-1)
        if self.shift is not None:
            kv = self.shift(kv.contiguous())
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # kvshift's order: shift -> k-norm -> RoPE
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim)).reshape(n, self.q_size)
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)).reshape(n, self.kv_size)
        q, k = self.rotary_emb(positions, q.contiguous(), k.contiguous())
        out = self.attn(q, k, v.contiguous())
        out, _ = self.o_proj(out)
        return out


class KVShiftDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, shift: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = KVShiftAttention(config, layer_idx, shift, vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=bool(config.mlp_bias), prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class KVShiftModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_servable(config)
        check_engine_config(vllm_config)
        _check_head_dim(config)
        if not get_pp_group().is_first_rank or not get_pp_group().is_last_rank:
            raise ValueError("kvshift's vLLM model does not support pipeline parallelism yet")
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            KVShiftDecoderLayer(config, i, shift, vllm_config, prefix=f"{prefix}.layers.{i}")
            for i, shift in enumerate(_shift_layers(config)))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


# checkpoint name piece -> (vLLM parameter name piece, shard id)
_STACKED = {".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
            ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


class KVShiftForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM's view of :class:`kvshift.KVShiftForCausalLM`: the same weights, vLLM's paged attention and
    state cache. Loaded from a kvshift checkpoint (``save_pretrained`` / ``kvshift train``'s ``final/``)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return MambaStateDtypeCalculator.short_conv_state_dtype(vllm_config.model_config.dtype,
                                                                vllm_config.cache_config.mamba_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        config = vllm_config.model_config.hf_config
        return _state_shape(_state_width(config, vllm_config.parallel_config.tensor_parallel_size), _state_window(config),
                            vllm_config.num_speculative_tokens or 0)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = KVShiftModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the tied head is the embedding
            shard = None
            for piece, (new, shard_id) in _STACKED.items():
                if piece in name:
                    name, shard = name.replace(piece, new), shard_id
                    break
            if name not in params:
                raise ValueError(f"checkpoint weight {name!r} has no place in kvshift's vLLM model (is this a "
                                 f"kvshift checkpoint of a supported form?)")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        for layer in self.model.layers:
            layer.self_attn.finish_loading()
        return loaded
