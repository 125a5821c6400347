"""Learned-shift analysis (paper Table 4) and per-head previous-token / induction attention scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.rope import apply_rope

__all__ = ["shift_table", "attention_maps", "head_scores", "repeated_sequence_loss"]


def shift_table(model) -> dict:
    """Per-head learned (alpha1, alpha2, beta1, beta2) and the paper's Table 4 count.

    Rows of ``heads``: ``{"layer", "head", "alpha1", "alpha2", "beta1", "beta2"}`` (alpha = key, beta =
    value; index 1 = current token, 2 = previous token). ``table`` counts heads whose key leans current
    (|alpha1| > |alpha2|) or previous, crossed with the same for the value. Magnitudes, not signed values:
    learned weights go negative (the paper's 2.9B model has beta2 = -0.15) and a key of
    ``0.1 k_t - 1.0 k_{t-1}`` reads the previous token; with both weights positive this is the paper's
    alpha1 > alpha2 rule.
    """
    heads = []
    for layer, (kw, vw) in model.kv_shift_weights().items():
        for h in range(kw.shape[0]):
            heads.append({"layer": layer, "head": h, "alpha1": float(kw[h, 0]), "alpha2": float(kw[h, 1]),
                          "beta1": float(vw[h, 0]), "beta2": float(vw[h, 1])})
    table = {"key_current/value_current": 0, "key_current/value_previous": 0,
             "key_previous/value_current": 0, "key_previous/value_previous": 0}
    for r in heads:
        k = "key_current" if abs(r["alpha1"]) > abs(r["alpha2"]) else "key_previous"
        v = "value_current" if abs(r["beta1"]) > abs(r["beta2"]) else "value_previous"
        table[f"{k}/{v}"] += 1
    n = len(heads)
    off_line = sum(abs(r["alpha1"] + r["alpha2"] - 1) > 0.05 or abs(r["beta1"] + r["beta2"] - 1) > 0.05
                   for r in heads)
    negative = sum(min(r["alpha1"], r["alpha2"], r["beta1"], r["beta2"]) < 0 for r in heads)
    diagonal = table["key_current/value_current"] + table["key_previous/value_previous"]
    return {"heads": heads, "table": table, "num_heads": n, "diagonal": diagonal,
            "off_convex_line": off_line, "with_negative_weight": negative}


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Causal attention probabilities ``[B, H, T, T]`` of every layer, recomputed from its inputs."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        model(input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    maps = []
    for i, layer in enumerate(model.model.layers):
        attn, x = layer.self_attn, captured[i]
        cos, sin = model.model.rotary_emb(x, pos)
        q = attn.q_proj(x).view(B, T, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim)
        if attn.shift_position == "post_rope":  # the layer's mixer of q and k (identity where it has none)
            q, k = attn.mix("q", apply_rope(q, cos, sin)), attn.mix("k", apply_rope(k, cos, sin))
        else:
            q, k = apply_rope(attn.mix("q", q), cos, sin), apply_rope(attn.mix("k", k), cos, sin)
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * attn.scaling
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    return maps


@torch.no_grad()
def head_scores(model, vocab_size: int, half_len: int = 32, batch: int = 16, seed: int = 0,
                low: int = 0) -> list[dict]:
    """Per head: previous-token score and induction score on a random sequence repeated twice.

    Previous-token score: mean attention from t to t-1. Induction score: mean attention, over the
    second copy, from position t to the position right after t's earlier occurrence (t - half_len + 1).
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab_size, (batch, half_len), generator=g)
    ids = torch.cat([first, first], dim=1)
    T = ids.shape[1]
    rows = []
    for layer, att in enumerate(attention_maps(model, ids)):
        t = torch.arange(1, T)
        prev = att[:, :, t, t - 1].mean(dim=(0, 2))
        t2 = torch.arange(half_len, T)
        ind = att[:, :, t2, t2 - half_len + 1].mean(dim=(0, 2))
        for h in range(att.shape[1]):
            rows.append({"layer": layer, "head": h, "previous_token_score": float(prev[h]),
                         "induction_score": float(ind[h])})
    return rows


@torch.no_grad()
def repeated_sequence_loss(model, vocab_size: int, half_len: int = 64, batch: int = 16, seed: int = 0,
                           low: int = 0) -> dict:
    """In-context copying probe: loss on the first and second copy of a repeated random sequence."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab_size, (batch, half_len), generator=g)
    ids = torch.cat([first, first], dim=1)
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    return {"first_half_loss": float(nll[:, : half_len - 1].mean()),
            "second_half_loss": float(nll[:, half_len:].mean()),
            "second_half_accuracy": float((logits[:, half_len:].argmax(-1) == ids[:, half_len + 1:]).float().mean())}
