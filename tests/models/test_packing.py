"""Packed rows behave exactly like separate documents, in every calling mode a user can reach."""

from __future__ import annotations

import itertools

import pytest
import torch
from builders import tiny_model

LENS = [5, 1, 7, 3]


def _docs(lens=LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g) for n in lens]


def _packing_kwargs(docs, how):
    if how == "position_ids":
        return {"position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}
    lens = torch.tensor([len(d) for d in docs])
    return {"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)}


def _model(kv_shift, kv_heads, mode):
    m = tiny_model(kv_shift=kv_shift, num_key_value_heads=kv_heads, attention_dropout=0.0)
    return m.train() if mode == "train" else m.eval()


MATRIX = list(itertools.product(["position_ids", "cu_seqlens"], [False, True], ["train", "eval"],
                                [True, False], [4, 2]))


@pytest.mark.parametrize("how,use_cache,mode,kv_shift,kv_heads", MATRIX)
def test_packed_equals_separate_everywhere(how, use_cache, mode, kv_shift, kv_heads):
    m = _model(kv_shift, kv_heads, mode)
    docs = _docs()
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        out = m(packed, use_cache=use_cache, **_packing_kwargs(docs, how)).logits[0]
        ref = torch.cat([m(d[None], use_cache=use_cache).logits[0] for d in docs])
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("kv_shift", [True, False])
def test_packed_row_is_causal(use_cache, kv_shift):
    m = _model(kv_shift, 2, "eval")
    docs = _docs()
    packed = torch.cat(docs)[None]
    kw = _packing_kwargs(docs, "position_ids")
    with torch.no_grad():
        base = m(packed, use_cache=use_cache, **kw).logits[0]
        for t in range(packed.shape[1] - 1):
            changed = packed.clone()
            changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 94 + 3
            out = m(changed, use_cache=use_cache, **kw).logits[0]
            assert (out[: t + 1] - base[: t + 1]).abs().max() <= 1e-5, t


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("kv_shift,kv_heads", [(True, 2), (True, 4), (False, 2)])
def test_packed_gradients_equal_sum_over_documents(how, kv_shift, kv_heads):
    m = _model(kv_shift, kv_heads, "train")
    docs = _docs()
    packed = torch.cat(docs)[None]

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    # sum of per-token losses, so the packed total equals the sum of the documents' totals
    def total(ids, **kw):
        logits = m(ids, use_cache=False, **kw).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum") if ids.shape[1] > 1 \
            else logits.sum() * 0

    # the packed row's targets never cross a document boundary
    logits = m(packed, use_cache=False, **_packing_kwargs(docs, how)).logits[0]
    pieces, start = [], 0
    for d in docs:
        n = len(d)
        if n > 1:
            pieces.append(torch.nn.functional.cross_entropy(logits[start:start + n - 1], d[1:], reduction="sum"))
        start += n
    g_packed = grads(sum(pieces))
    g_sep = grads(sum(total(d[None]) for d in docs))
    assert g_packed.keys() == g_sep.keys()
    if kv_shift:
        assert any("k_shift" in n for n in g_packed)
    for n in g_packed:
        assert torch.allclose(g_packed[n], g_sep[n], atol=1e-4, rtol=1e-4), n


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kv_shift", [True, False])
def test_data_collator_with_flattening_equals_separate(mode, kv_shift):
    from transformers import DataCollatorWithFlattening

    m = _model(kv_shift, 2, mode)
    docs = _docs()
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs])
    assert "attention_mask" not in batch
    with torch.no_grad():
        out = m(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        ref = torch.cat([m(d[None]).logits[0] for d in docs])
    assert (out - ref).abs().max() <= 1e-4
    # the collator's labels mask the first token of every document: the loss equals the separate sum
    with torch.no_grad():
        loss = m(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        ref_sum = sum(torch.nn.functional.cross_entropy(m(d[None]).logits[0, :-1], d[1:], reduction="sum")
                      for d in docs if len(d) > 1)
    n_targets = sum(len(d) - 1 for d in docs)
    assert abs(loss.item() - ref_sum.item() / n_targets) <= 1e-4
