"""Pre-norm decoder block: RMSNorm -> (KV-shifting) attention -> RMSNorm -> SwiGLU, with residuals."""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import KVShiftAttention
from .mlp import MLP
from .norm import RMSNorm


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = KVShiftAttention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask=None, cache=None,
                pad_mask=None, reset_mask=None, shift_state=None, **kwargs) -> torch.Tensor:
        attn, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, pad_mask, reset_mask,
            shift_state, **kwargs,
        )
        h = hidden_states + attn
        return h + self.mlp(self.post_attention_layernorm(h))
