"""vLLM serving: greedy tokens from vLLM's engine equal Hugging Face ``generate`` exactly, under continuous
batching, chunked prefill, preemption and prefix caching, for MHA and GQA checkpoints with the shift on, partly on and off;
``vllm serve`` answers OpenAI completions; unsupported checkpoints are refused naming the field.

Runs in the serving env only (``bash scripts/setup.sh --serve --test``; vLLM pins an older transformers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is more than tests need
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from builders import tiny_model  # noqa: E402

from kvshift.data.tokenizer import byte_tokenizer  # noqa: E402
from kvshift.serving.offline import hf_greedy, mixed_prompts, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm

NEW = 16
# head_dim 32: the smallest head size vLLM's CPU attention has kernels for
CASES = {
    "mha": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2),
    "gqa-gate-qknorm-layer0": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, qk_norm=True,
                                   qkv_bias=True, kv_shift_parametrization="gate", kv_shift=[True, False]),
    "shift-off": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, kv_shift=False),
    # the lab's variants that are the same convolution with another width or weight layout
    "w3-channel-residual": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, kv_shift_window=3,
                                kv_shift_granularity="channel", kv_shift_residual=True),
    "w4-gate": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, kv_shift_window=4,
                    kv_shift_parametrization="gate"),
    # Baichuan-M1's shape: a sliding-window layer (8 tokens, shorter than most prompts) with its own head counts
    # (2 heads of size 64, 2 KV heads: twice the full layer's K|V channels, so the full layer's state is padded)
    "sliding-own-heads": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], num_swa_attention_heads=2,
                              num_swa_key_value_heads=2),
}


def _save(path: Path, **overrides) -> Path:
    """A tiny byte-vocabulary checkpoint with random weights and random (off-convex) shift weights, saved
    as ``kvshift train`` saves ``final/``: the model and its tokenizer."""
    fields = dict(vocab_size=257, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=96,
                  initializer_range=0.1, pad_token_id=256, bos_token_id=None, eos_token_id=256)
    model = tiny_model(seed=0, **{**fields, **overrides})
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path = _save(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    prompts = mixed_prompts(32, (1, 45))
    reference, _ = hf_greedy(str(path), prompts, NEW)
    return request.param, str(path), prompts, reference


def _mismatches(got, want) -> list[int]:
    assert len(got) == len(want)
    return [i for i, (a, b) in enumerate(zip(got, want)) if a != b]


def test_shift_changes_the_reference(tmp_path):
    """The comparison can fail: the same weights with the shift made the identity decode other tokens."""
    path = _save(tmp_path / "ck", **CASES["mha"])
    prompts = mixed_prompts(32, (1, 45))
    shifted, _ = hf_greedy(str(path), prompts, NEW)
    from kvshift.models import KVShiftForCausalLM

    model = KVShiftForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_shift.copy_(torch.tensor([1.0, 0.0]).expand_as(layer.self_attn.k_shift))
            layer.self_attn.v_shift.copy_(torch.tensor([1.0, 0.0]).expand_as(layer.self_attn.v_shift))
    plain, _ = hf_greedy(str(path), prompts, NEW, model=model)
    assert len(_mismatches(plain, shifted)) >= 24


def test_continuous_batching_matches_hf(case):
    name, path, prompts, reference = case
    tokens, stats = vllm_greedy(path, prompts, NEW, max_num_seqs=8)
    assert stats["max_running"] == 8  # requests really shared the engine's batches
    assert _mismatches(tokens, reference) == []


def test_chunked_prefill_matches_hf(case):
    name, path, prompts, reference = case
    if name == "shift-off":
        pytest.skip("no shift state to carry across chunks")
    assert max(len(p) for p in prompts) > 2 * 16  # some prompts are prefilled in three chunks or more
    tokens, stats = vllm_greedy(path, prompts, NEW, enable_chunked_prefill=True, max_num_batched_tokens=16,
                                max_num_seqs=8)
    assert _mismatches(tokens, reference) == []


def test_preemption_matches_hf(tmp_path):
    """Too few KV blocks for every request: vLLM preempts running requests and recomputes them later,
    so their shift state must start again from zero at the recomputed prefill."""
    path = str(_save(tmp_path / "ck", **CASES["mha"]))
    prompts = mixed_prompts(32, (1, 20), seed=1)
    reference, _ = hf_greedy(path, prompts, 40)
    tokens, stats = vllm_greedy(path, prompts, 40, num_gpu_blocks_override=8, block_size=16)
    assert stats["preemptions"] > 0
    assert _mismatches(tokens, reference) == []


@pytest.mark.parametrize("name", ["gqa-gate-qknorm-layer0", "w3-channel-residual", "sliding-own-heads"])
def test_prefix_caching_matches_hf(tmp_path, name):
    """Prompts sharing a 65-70-token prefix, one at a time: later ones start from cached blocks, and from
    the shift state vLLM saved at that block boundary ('align' mode; two raw rows for window 3)."""
    path = str(_save(tmp_path / "ck", **CASES[name]))
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(1, 256, (70,), generator=g).tolist()
    prompts = [shared[:70 - i] + torch.randint(1, 256, (1 + i % 5,), generator=g).tolist() for i in range(12)]
    reference, _ = hf_greedy(path, prompts, 8)
    tokens, stats = vllm_greedy(path, prompts, 8, enable_prefix_caching=True, block_size=16, max_num_seqs=1)
    assert stats["prefix_cached_tokens"] >= 4 * 64  # later prompts started from cached 16-token blocks
    assert _mismatches(tokens, reference) == []


@pytest.mark.parametrize("field,value", [("kv_shift_window", 5), ("kv_shift_position", "post_rope"),
                                         ("kv_shift_targets", "k"), ("kv_shift_targets", "qkv"),
                                         ("token_smear", True), ("hidden_act", "gelu")])
def test_unservable_configs_are_refused_naming_the_field(field, value):
    from kvshift.models import KVShiftConfig
    from kvshift.serving.vllm_model import check_servable

    check_servable(KVShiftConfig())  # the default config serves, and so do the convolution variants
    check_servable(KVShiftConfig(kv_shift_window=4, kv_shift_granularity="channel", kv_shift_residual=True))
    check_servable(KVShiftConfig(sliding_window=16))  # and sliding windows
    with pytest.raises(ValueError, match=field):
        check_servable(KVShiftConfig(**{field: value}))


def test_a_head_size_without_a_cpu_kernel_is_refused_naming_head_dim():
    from kvshift.models import KVShiftConfig
    from kvshift.serving.vllm_model import _check_head_dim

    _check_head_dim(KVShiftConfig(hidden_size=64, num_attention_heads=2))  # head_dim 32: served
    with pytest.raises(ValueError, match="head_dim=16"):
        _check_head_dim(KVShiftConfig(hidden_size=64, num_attention_heads=4))
    with pytest.raises(ValueError, match="swa_head_dim=16"):  # a sliding-window layer's own head size
        _check_head_dim(KVShiftConfig(hidden_size=64, num_attention_heads=2, sliding_window=4, num_hidden_layers=2,
                                      layer_types=["full_attention", "sliding_attention"], swa_head_dim=16))


def test_the_window_changes_the_reference(tmp_path):
    """The sliding-window comparison can fail: the same weights without the window decode other tokens."""
    from kvshift.models import KVShiftForCausalLM

    path = _save(tmp_path / "ck", **CASES["sliding-own-heads"])
    prompts = mixed_prompts(32, (1, 45))
    windowed, _ = hf_greedy(str(path), prompts, NEW)
    model = KVShiftForCausalLM.from_pretrained(str(path)).eval()
    model.config.sliding_window = 10_000  # what a server that ignored the window would compute
    full, _ = hf_greedy(str(path), prompts, NEW, model=model)
    assert len(_mismatches(full, windowed)) >= 8


def test_a_converted_baichuan_m1_checkpoint_serves_like_hf(tmp_path):
    """`kvshift convert` of a Baichuan-M1-layout checkpoint (GQA; layers 1 and 3 sliding over 8 tokens with their
    own head counts): vLLM's tokens equal Hugging Face's, for prompts longer than the window."""
    from kvshift.models.baichuan_m1 import make_tiny_checkpoint
    from kvshift.models.convert import convert_checkpoint

    src = make_tiny_checkpoint(tmp_path / "m1", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                               num_swa_attention_heads=2, num_swa_key_value_heads=1, sliding_window=8,
                               tokenizer=byte_tokenizer())
    path = str(tmp_path / "kv")
    convert_checkpoint(str(src), path)
    prompts = mixed_prompts(16, (9, 40))
    reference, _ = hf_greedy(path, prompts, NEW)
    tokens, _ = vllm_greedy(path, prompts, NEW, max_num_seqs=8, enable_chunked_prefill=True,
                            max_num_batched_tokens=16)
    assert _mismatches(tokens, reference) == []


def test_bench_vllm_times_vllm_alone_or_against_the_hf_baselines_asked_for(tmp_path):
    """``--hf-batch-sizes none`` times vLLM alone (no HF row, no ratio); a list gives one HF row per size,
    ratios over the first, and counts the prompts whose tokens equal vLLM's."""
    from kvshift.serving.offline import bench_vllm

    path = str(_save(tmp_path / "ck", **CASES["mha"]))
    alone = bench_vllm(path, num_prompts=4, max_new_tokens=4, hf_batch_sizes=())
    assert [r["engine"] for r in alone] == ["vllm LLM.generate, max_num_seqs 32"]
    assert not any(k.startswith("vs_") for k in alone[0])
    rows = bench_vllm(path, num_prompts=4, max_new_tokens=4, hf_batch_sizes=(2,))
    assert [r["engine"] for r in rows] == ["hf generate, batch 2", "vllm LLM.generate, max_num_seqs 32"]
    assert rows[0]["vs_hf_batch2"] == 1.0 and rows[0]["same_tokens_as_vllm"] == "4/4"
