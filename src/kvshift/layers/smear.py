"""Token smear: a gated share of the previous token's embedding added to each token's (nanochat /
modded-nanogpt's cheap previous-token mixing, here as one of KV shifting's relatives)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.short_conv import short_conv

__all__ = ["TokenSmear"]

GATE_CHANNELS = 24


class TokenSmear(nn.Module):
    """``e'_t = e_t + lambda * sigmoid(g . e_t[:c]) * e_{t-1}``, ``c = min(24, hidden)``.

    ``e_{t-1}`` is zero at sequence and document starts and for padding (the boundary rule of every mixer
    here); ``smear_lambda`` and ``smear_gate`` start at zero and draw nothing from the global RNG, so a
    model with the smear starts from the same shared weights as one without.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.gate_channels = min(GATE_CHANNELS, hidden_size)
        self.smear_gate = nn.Parameter(torch.zeros(self.gate_channels))
        self.smear_lambda = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.smear_gate.zero_()
            self.smear_lambda.zero_()

    def forward(self, x: torch.Tensor, *, prev: torch.Tensor | None = None, pad_mask=None,
                reset_mask=None) -> torch.Tensor:
        """``x`` ``[B, T, hidden]``; ``prev`` ``[B, 1, hidden]``: the raw embedding before position 0."""
        # the predecessor alone, made on the device (torch.tensor from host data would be a copy and a sync)
        w = torch.zeros(1, 2, dtype=torch.float32, device=x.device)
        w[:, 1] = 1.0
        before = short_conv(x[:, :, None], w, attention_mask=pad_mask, reset_mask=reset_mask,
                            prev=None if prev is None else prev[:, :, None])[:, :, 0]
        gate = torch.sigmoid(x[..., : self.gate_channels] @ self.smear_gate.to(x.dtype))[..., None]
        return x + self.smear_lambda.to(x.dtype) * gate * before
