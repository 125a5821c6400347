"""Packed rows on FlexAttention: a block-sparse BlockMask (never a dense mask) whose forward equals SDPA with
its dense document mask and the documents run separately, with and without the shift, MHA and GQA. CPU:
forward only (FlexAttention has no backward on CPU in torch 2.13)."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_model
from torch.nn.attention.flex_attention import BlockMask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

LENGTHS = [[5, 9, 2], [16]]  # row 0 packs three documents, row 1 holds one


def _rows():
    torch.manual_seed(3)
    docs = [[torch.randint(3, 97, (n,)) for n in row] for row in LENGTHS]
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    return docs, ids, pos


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kv_shift", [True, False], ids=["kvshift", "vanilla"])
def test_flex_packed_equals_sdpa_dense_and_separate(kv_shift, kv_heads, monkeypatch):
    docs, ids, pos = _rows()
    models = {}
    for impl in ("sdpa", "flex_attention"):
        m = tiny_model(num_key_value_heads=kv_heads, kv_shift=kv_shift)
        m.config._attn_implementation = impl
        models[impl] = m
    masks = []
    real_flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def recording(module, q, k, v, attention_mask, **kwargs):
        masks.append(attention_mask)
        return real_flex(module, q, k, v, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", recording)
    with torch.no_grad():
        flex = models["flex_attention"](ids, position_ids=pos, use_cache=False).logits
        sdpa = models["sdpa"](ids, position_ids=pos, use_cache=False).logits
        separate = [torch.cat([models["sdpa"](d[None], use_cache=False).logits[0] for d in row]) for row in docs]
    assert masks and all(isinstance(mk, BlockMask) for mk in masks)  # block-sparse, never dense
    assert (flex - sdpa).abs().max() <= 1e-5
    for r in range(len(docs)):
        assert (flex[r] - separate[r]).abs().max() <= 1e-5
