"""The trainer's forward builds no [B, 1, T, T] mask for batches without a document start inside a row (SDPA
can take its is_causal / flash path), in eager and compiled mode, vanilla and KV shifting; packed batches
get the document mask; the backend follows model.attn_implementation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvshift.train import loop
from kvshift.train.config import apply_overrides
from kvshift.train.loop import attention_for_device, build_model_for_data
from kvshift.train.recipes import get_recipe

SEEN: list = []


def recording_sdpa(module, q, k, v, attention_mask, **kwargs):
    SEEN.append(None if attention_mask is None else tuple(attention_mask.shape))
    return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)


AttentionInterface.register("kvshift_test_recording_sdpa", recording_sdpa)
AttentionMaskInterface.register("kvshift_test_recording_sdpa", sdpa_mask)  # SDPA's masks, SDPA's skips


def batch(packed: bool, B: int = 2, T: int = 16) -> dict:
    ids = torch.randint(0, 257, (B, T))
    pos = torch.arange(T).repeat(B, 1)
    if packed:
        pos[0, 9:] = torch.arange(T - 9)  # a document starts at t = 9 of row 0
    return {"input_ids": ids, "labels": ids, "position_ids": pos}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kv_shift", [True, False], ids=["kvshift", "vanilla"])
def test_unpacked_batches_build_no_mask(compiled, kv_shift):
    cfg = get_recipe("tiny")
    cfg.model.kv_shift = kv_shift
    cfg.model.attn_implementation = "kvshift_test_recording_sdpa"
    model = build_model_for_data(cfg, 257, 256)
    model.train()
    run = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
    for packed in (False, True, False):
        SEEN.clear()
        nll, _ = loop._nll_sum(run, batch(packed), torch.device("cpu"), contextlib.nullcontext)
        nll.backward()
        assert len(SEEN) == cfg.model.num_hidden_layers
        if packed:
            assert all(s == (2, 1, 16, 16) for s in SEEN), SEEN
        else:
            assert all(s is None for s in SEEN), SEEN


def test_unpacked_batch_without_positions_equals_with_positions():
    cfg = get_recipe("tiny")
    model = build_model_for_data(cfg, 257, 256).eval()
    b = batch(False)
    with torch.no_grad():
        a = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        c = model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_attention_backend_by_config_and_device():
    assert attention_for_device("auto", "cuda") == "flex_attention"
    assert attention_for_device("auto", "cpu") == "sdpa"
    assert attention_for_device("eager", "cuda") == "eager"
    cfg = get_recipe("tiny")
    cfg.model.attn_implementation = "eager"
    assert build_model_for_data(cfg, 257, 256).config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="model.attn_implementation"):
        apply_overrides(get_recipe("tiny"), ["model.attn_implementation=fast"])


def test_flex_attention_cannot_train_on_cpu(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), ["model.attn_implementation=flex_attention", "steps=1"])
    with pytest.raises(ValueError, match="no backward on CPU"):
        loop.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
