"""`KVShiftForCausalLM`: the one model definition, a Hugging Face `PreTrainedModel` with `GenerationMixin`."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from ..layers.attention import SHIFT_PARAMETER_NAMES, KVShiftAttention
from ..layers.block import DecoderLayer
from ..layers.norm import RMSNorm
from ..layers.rope import RotaryEmbedding
from ..layers.smear import TokenSmear
from ..ops.kv_shift.checks import previous_token_keep_mask, validate_cu_seqlens
from .cache import kv_shift_layer_state
from .configuration import KVShiftConfig

# transformers 5.20 renamed the mask builders' `past_key_values` argument to `cache`; vLLM 0.32 (the serving
# extra) pins transformers < 5.20, so the name is read off the signature once
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# ... and the output classes' `past_key_values` field to `cache`
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["KVShiftPreTrainedModel", "KVShiftModel", "KVShiftForCausalLM", "KVShiftForSequenceClassification",
           "KVShiftForTokenClassification", "KVShiftForQuestionAnswering", "position_ids_from_cu_seqlens"]


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, total]`` positions restarting at 0 at every offset of ``cu_seqlens``."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)  # output_size: no device sync
    return (torch.arange(total, device=cu.device) - starts)[None]


def reset_mask_from_position_ids(position_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
    """``[B, T]`` True where a new sequence starts: a position that does not follow its left neighbour
    by one (the packed-sequence rule of Hugging Face masks), or a 0 right after cached tokens."""
    reset = torch.zeros_like(position_ids, dtype=torch.bool)
    # branchless: `past` is a tensor for static caches, and data-dependent branches break torch.compile
    reset[:, 0] = (position_ids[:, 0] == 0) & (past > 0)
    reset[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return reset


def document_mask_function(reset_mask: torch.Tensor, past: int | torch.Tensor):
    """A Hugging Face mask function keeping attention inside documents (``and``-ed with the causal mask).

    Queries are the current chunk; keys are the ``past`` cached tokens followed by the chunk. Cached
    tokens belong to the chunk's first document unless the chunk starts with a reset. ``past`` may be a
    static cache's 0-d device tensor: the document of a cache position is index arithmetic on it (no
    tensor sized by it, which would read it on the host: a sync, and no CUDA graphs when compiled).
    """
    doc_q = reset_mask.long().cumsum(-1)  # [B, T]
    last = doc_q.shape[-1] - 1

    def doc(batch_idx, idx):
        # idx is an absolute position in the cache (a static cache has slots past the chunk: the causal
        # mask hides them). torch.where, not clamp: Inductor's CPU code for FlexAttention's block mask
        # fails to compile the clamp form (torch 2.13: mixed int/float vector masks).
        rel = idx - past
        i = torch.where(rel < 0, 0, torch.where(rel > last, last, rel))
        return torch.where(rel < 0, 0, doc_q[batch_idx, i])  # cached tokens: document 0

    def fn(batch_idx, head_idx, q_idx, kv_idx):
        return doc(batch_idx, q_idx) == doc(batch_idx, kv_idx)

    return fn


def _host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync and no graph break (CPU, outside torch.compile)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _pad_mask(attention_mask, T: int, past: int, kv_offset: int = 0) -> torch.Tensor | None:
    """``[B, T]`` 1 = real token for the current chunk, from a 2-D mask or from a 4-D mask's diagonal.

    ``kv_offset`` is the absolute position of the 4-D mask's first key (non-zero for sliding-window caches).
    """
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask[:, -T:]
    if attention_mask.dim() == 4:  # a token attends to itself iff it is real
        idx = torch.arange(T, device=attention_mask.device)
        diag = attention_mask[:, 0, idx, past - kv_offset + idx]
        return diag if diag.dtype == torch.bool else diag == 0
    return None


class KVShiftPreTrainedModel(PreTrainedModel):
    config_class = KVShiftConfig
    config: KVShiftConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": DecoderLayer, "attentions": KVShiftAttention}
    # The token-mixing scalars stay fp32 whatever dtype the model loads in: in bf16 a current-token weight
    # of 1 cannot take a step smaller than 2^-8 (1 - 1e-4 rounds back to 1), so it would never train.
    _keep_in_fp32_modules_strict = list(SHIFT_PARAMETER_NAMES)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # (RotaryEmbedding's buffers are set by transformers' own _init_weights, through
        # compute_default_rope_parameters or its RoPE init functions)
        if isinstance(module, KVShiftAttention):
            # a peeked generator: the global RNG, and so every shared weight, is the vanilla model's
            module.reset_shift_parameters()
        elif isinstance(module, TokenSmear):
            module.reset_parameters()


class KVShiftModel(KVShiftPreTrainedModel):
    """The decoder stack (embeddings, layers, final norm) returning hidden states."""

    def __init__(self, config: KVShiftConfig) -> None:
        super().__init__(config)
        if len(config.layer_types) != config.num_hidden_layers:  # e.g. num_hidden_layers changed after loading
            raise ValueError(f"layer_types has {len(config.layer_types)} entries but num_hidden_layers is "
                             f"{config.num_hidden_layers}: give layer_types one entry per layer")
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # sliding-window layers with their own head size get their own cos/sin (the same RoPE otherwise)
        self.rotary_emb_swa = None
        if "sliding_attention" in config.layer_types and config.swa_head_dim != config.head_dim:
            swa_config = copy.copy(config)
            swa_config.head_dim = config.swa_head_dim
            self.rotary_emb_swa = RotaryEmbedding(swa_config)
        self.smear = TokenSmear(config.hidden_size) if getattr(config, "token_smear", False) else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        packed: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hidden states of the decoder stack. ``output_hidden_states`` / ``output_attentions`` /
        ``return_dict`` come from the keyword or, when not given, from the config (transformers' rule).

        ``packed=False``: ``position_ids`` are RoPE positions only and never start a document, so no
        document mask is built (``generate()`` passes it: its positions restart only after left padding,
        which the attention mask covers). With the default, a position that does not follow its left
        neighbour starts a document (packed rows).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0

        if cu_seqlens is not None:
            validate_cu_seqlens(cu_seqlens, B, T)
            if position_ids is None:
                position_ids = position_ids_from_cu_seqlens(cu_seqlens.to(inputs_embeds.device), T)
        # positions made here continue the cache: they can never start a document (no reset, no sync)
        may_pack = position_ids is not None and (packed or cu_seqlens is not None)
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past)[None].expand(B, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.shape[-1] != T:
            raise ValueError(f"position_ids must be [B, T] with T = {T}, got {list(position_ids.shape)}")
        if position_ids.shape[0] != B:
            position_ids = position_ids.expand(B, T)

        reset_mask = reset_mask_from_position_ids(position_ids, past) if may_pack else None
        # Dropping a reset mask without resets keeps SDPA's is_causal path; deciding that reads the mask,
        # which is free on CPU but a device sync elsewhere: on GPU (and under torch.compile) the mask is kept
        # and every path below handles it branch-free. Pass position_ids on GPU only for packed rows.
        if reset_mask is not None and _host_readable(reset_mask) and not bool(reset_mask.any()):
            reset_mask = None
        # generate() with a static cache hands over its own masks, one per layer type (transformers' convention)
        premade = attention_mask if isinstance(attention_mask, dict) else None
        mask_layer = 0
        if premade is not None:
            kind = "full_attention" if "full_attention" in premade else next(iter(premade))
            attention_mask, mask_layer = premade[kind], self.config.layer_types.index(kind)
        kv_offset = 0
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and cache is not None:
            # a sliding-window cache layer's mask starts at kv_offset, not at position 0
            kv_offset = cache.get_mask_sizes(T, mask_layer)[1]
        pad_mask = _pad_mask(attention_mask, T, past, kv_offset)

        # Document masking has one owner: `document_mask_function`, built from the reset mask, which knows
        # the cache. position_ids are withheld from transformers on purpose: without a cache it would detect
        # packing itself and remap the indices handed to mask functions to per-document positions, which is
        # how packed training once attended across documents (and it cannot see documents after a cache).
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=None, **{_MASK_CACHE_ARG: cache})
        if getattr(cache, "is_compileable", False):
            # A static cache returns max_cache_len keys: never rely on SDPA's is_causal (it needs T == S)
            mask_kwargs["allow_is_causal_skip"] = False
        if reset_mask is not None and (attention_mask is None or attention_mask.dim() == 2):
            mask_kwargs["and_mask_function"] = document_mask_function(reset_mask, past)
        # one mask per attention type the layers use (transformers' layer_types convention)
        mask_makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {kind: premade[kind] if premade is not None and kind in premade else mask_makers[kind](**mask_kwargs)
                 for kind in dict.fromkeys(self.config.layer_types)}

        hidden = inputs_embeds
        if self.smear is not None:
            state = kv_shift_layer_state(cache, 0) if cache is not None else None
            hidden = self.smear(hidden, prev=state.conv_rows("smear") if state is not None else None,
                                pad_mask=pad_mask, reset_mask=reset_mask)
            if state is not None:
                state.push_conv_rows({"smear": inputs_embeds}, 1, pad_mask, reset_mask)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        position_embeddings_swa = (self.rotary_emb_swa(hidden, position_ids) if self.rotary_emb_swa is not None
                                   else position_embeddings)
        # what the attention backends may use besides the mask (flash-attention's varlen path reads
        # position_ids when there is no mask)
        backend_kwargs = {"position_ids": position_ids}
        if T > 1 and any(layer.self_attn.use_kv_shift and layer.self_attn.paper_form for layer in self.layers):
            # which tokens read their predecessor: one [B, T] mask for every layer's K and V (the decode step,
            # T == 1, has its own branch-free path)
            keep = previous_token_keep_mask(B, T, inputs_embeds.device, attention_mask=pad_mask, has_prev=True,
                                            reset_mask=reset_mask)
            backend_kwargs["keep_mask"] = (keep,)
        for i, layer in enumerate(self.layers):
            state = kv_shift_layer_state(cache, i) if cache is not None and layer.self_attn.use_kv_shift else None
            kind = self.config.layer_types[i]
            hidden = layer(hidden, position_embeddings_swa if kind == "sliding_attention" else position_embeddings,
                           masks[kind], cache, pad_mask, reset_mask, state, **backend_kwargs)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_OUTPUT_CACHE_FIELD: cache if use_cache else None})


def finish_meta_model(model: KVShiftForCausalLM, device=None) -> None:
    """Finish a model built on the meta device whose weights were then assigned (a conversion): compute the RoPE
    buffers of every rotary embedding (the sliding layers' own too), which no checkpoint holds, and raise if any
    parameter or buffer is still on the meta device."""
    for rotary in (model.model.rotary_emb, model.model.rotary_emb_swa):
        if rotary is not None:
            inv_freq, _ = rotary.compute_inv_freq(device)
            rotary.register_buffer("inv_freq", inv_freq, persistent=False)
            rotary.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left tensors unset: {left}")


class KVShiftForCausalLM(KVShiftPreTrainedModel, GenerationMixin):
    """Llama-style causal LM with KV shifting attention; parameter names follow ``LlamaForCausalLM``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: KVShiftConfig) -> None:
        super().__init__(config)
        self.model = KVShiftModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Transformers' cache set-up, then every KV-shift layer's cache slot upgraded at once.

        Assisted decoding and prompt lookup call ``cache.activate_past_recording()`` before the prefill;
        a layer that is still a plain cache layer then would not record the raw rows a rollback needs.
        """
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if isinstance(cache, Cache):
            for i, layer in enumerate(self.model.layers):
                if layer.self_attn.use_kv_shift or (i == 0 and self.model.smear is not None):
                    kv_shift_layer_state(cache, i)  # layer 0 also keeps the smear's previous embedding
            if getattr(generation_config, "is_assistant", False):  # transformers asked before the upgrade
                cache.activate_past_recording()
        return out

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """Transformers' inputs, marked unpacked: generation never packs documents in a row, so every step
        takes the causal path (SDPA's ``is_causal`` / the flash kernel), never a dense document mask."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["packed"] = False
        return inputs

    def kv_shift_weights(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Effective ``{layer: (k_weight, v_weight)}``, each ``[num_key_value_heads, 2]`` = (current, previous)."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            w = layer.self_attn.shift_weights()
            if w is not None:
                out[i] = (w[0].detach().float().cpu(), w[1].detach().float().cpu())
        return out

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        packed: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss with ``labels``); output flags and ``return_dict`` as in transformers;
        ``packed`` as in :meth:`KVShiftModel.forward`."""
        flags = {k: kwargs.pop(k) for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache,
            cu_seqlens=cu_seqlens, packed=packed, cache=cache, return_dict=True, **flags,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class KVShiftForSequenceClassification(GenericForSequenceClassification, KVShiftPreTrainedModel):
    """Sequence classification on the last non-pad token (transformers' generic head over KVShiftModel)."""


class KVShiftForTokenClassification(GenericForTokenClassification, KVShiftPreTrainedModel):
    """Per-token classification (transformers' generic head over KVShiftModel)."""


class KVShiftForQuestionAnswering(GenericForQuestionAnswering, KVShiftPreTrainedModel):
    """Extractive QA start/end logits (transformers' generic head over KVShiftModel)."""
