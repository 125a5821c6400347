"""vLLM at scale: n-gram speculative decoding (prompt lookup) with the shift state rolled back per token
(speculation with a draft network is refused, see below), and tensor parallelism (``tensor_parallel_size=2`` on vLLM's CPU build) with the shift
weights sharded with their KV heads, or replicated where there are fewer KV heads than ranks.

Contract: greedy tokens equal Hugging Face ``generate`` (and so each other) token for token in every mode.

Runs in the serving env only (``bash scripts/setup.sh --serve --test``).
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from builders import tiny_model  # noqa: E402

from kvshift.data.tokenizer import byte_tokenizer  # noqa: E402
from kvshift.serving.offline import hf_greedy, mixed_prompts, vllm_greedy  # noqa: E402
from kvshift.serving.vllm_model import kv_head_shard, shift_decode_speculative  # noqa: E402

pytestmark = pytest.mark.vllm

FIELDS = dict(vocab_size=257, intermediate_size=128, num_hidden_layers=2, initializer_range=0.1, pad_token_id=256,
              bos_token_id=None, eos_token_id=256, hidden_size=128, num_attention_heads=4)


def _save(path, **overrides) -> str:
    tiny_model(seed=0, **{**FIELDS, **overrides}).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _mismatches(got, want) -> list[int]:
    assert len(got) == len(want)
    return [i for i, (a, b) in enumerate(zip(got, want)) if a != b]


def _fresh_process(fn, *args, **kwargs):
    """Run ``fn`` in a new interpreter: vLLM 0.32's CPU build cannot start a second engine with speculative
    decoding in a process that already ran one (its Triton-override scan fails on a '_lib_fn_wrapper')."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


# -- the rollback on its own ----------------------------------------------------------------------------

def _reference(stream: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mixer over a whole raw stream ``[T, C]`` (zero rows before it); ``weight`` ``[C, W]`` oldest lag first."""
    window = weight.shape[1]
    padded = torch.cat([stream.new_zeros(window - 1, stream.shape[1]), stream])
    return sum(padded[i:i + len(stream)] * weight[:, i] for i in range(window))


@pytest.mark.parametrize("window", [2, 3, 4])
def test_speculative_rollback_equals_the_accepted_stream(window):
    """Verify steps with drafts, some accepted and some not: every accepted token's mixed row equals the
    mixer over the accepted stream alone, so the rejected drafts left no trace in the state."""
    g = torch.Generator().manual_seed(window)
    channels, num_spec, requests = 6, 3, 3
    weight = torch.randn(channels, window, generator=g, dtype=torch.float64)
    state = torch.zeros(8, channels, window - 1 + num_spec, dtype=torch.float64)
    slots = torch.tensor([5, 2, 7])
    streams = []
    for r in range(requests):  # a prefill: the slot keeps the last window - 1 raw rows
        prompt = torch.randn(2 + r, channels, generator=g, dtype=torch.float64)
        streams.append(prompt)
        tail = torch.cat([prompt.new_zeros(window - 1, channels), prompt])[-(window - 1):]
        state[slots[r], :, :window - 1] = tail.t()
    accepted = torch.ones(requests, dtype=torch.long)
    rejected = 0
    for _ in range(12):
        drafts = torch.randint(0, num_spec + 1, (requests,), generator=g)
        keep = torch.stack([torch.randint(0, int(d) + 1, (1,), generator=g)[0] for d in drafts])
        rejected += int((keep < drafts).sum())
        rows, lengths, truth = [], [], []
        for r in range(requests):
            true_rows = torch.randn(1 + int(keep[r]), channels, generator=g, dtype=torch.float64)
            junk = torch.randn(int(drafts[r] - keep[r]), channels, generator=g, dtype=torch.float64) * 100
            rows.append(torch.cat([true_rows, junk]))
            lengths.append(1 + int(drafts[r]))
            truth.append(true_rows)
        qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        out = shift_decode_speculative(torch.cat(rows), state, weight, slots, accepted, qsl)
        for r in range(requests):
            streams[r] = torch.cat([streams[r], truth[r]])
            want = _reference(streams[r], weight)[-len(truth[r]):]
            torch.testing.assert_close(out[qsl[r]:qsl[r] + len(truth[r])], want, rtol=1e-12, atol=1e-12)
        accepted = 1 + keep
    assert rejected > 5  # drafts really were rolled back


def test_rollback_breaks_when_the_accepted_count_is_ignored():
    """The check above can fail: reading the predecessor from column 0 after an accepted draft is wrong."""
    weight = torch.tensor([[0.5, 1.0]], dtype=torch.float64)  # (previous, current)
    state = torch.zeros(2, 1, 3, dtype=torch.float64)
    rows = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)  # last token, two drafts
    shift_decode_speculative(rows, state, weight, torch.tensor([1]), torch.tensor([1]), torch.tensor([0, 3]))
    # the first draft was accepted: the next token's predecessor is 2.0 (column 1), not 1.0 (column 0)
    nxt = torch.tensor([[4.0]], dtype=torch.float64)
    out = shift_decode_speculative(nxt, state, weight, torch.tensor([1]), torch.tensor([2]), torch.tensor([0, 1]))
    assert out.item() == 4.0 + 0.5 * 2.0
    out_wrong = shift_decode_speculative(nxt, state.clone(), weight, torch.tensor([1]), torch.tensor([1]),
                                         torch.tensor([0, 1]))
    assert out_wrong.item() != out.item()


# -- speculative decoding in vLLM's engine ----------------------------------------------------------------

def _repetitive_prompts(n: int = 16, seed: int = 5) -> list[list[int]]:
    """Prompts that repeat a short random unit: n-gram lookup finds drafts in them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        unit = torch.randint(1, 256, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        out.append((unit * 12)[:20 + 3 * i])
    return out


SPEC_CASES = {"paper": dict(num_key_value_heads=2),
              # the lab's window-3 per-channel residual mixer: a three-column state window to roll back
              "w3-channel-residual": dict(num_key_value_heads=2, kv_shift_window=3, kv_shift_granularity="channel",
                                          kv_shift_residual=True),
              # a sliding-window layer (8 tokens) with its own heads: the window moves back with a rejected draft
              "sliding-own-heads": dict(num_key_value_heads=2, sliding_window=8, num_swa_attention_heads=2,
                                        num_swa_key_value_heads=1, layer_types=["sliding_attention", "full_attention"])}


def _spec_case(root, name):
    path = _save(root / name, max_position_embeddings=160, **SPEC_CASES[name])
    prompts = _repetitive_prompts()
    reference, _ = hf_greedy(path, prompts, 32)
    return path, prompts, reference


@pytest.fixture(scope="module")
def spec_case(tmp_path_factory):
    return _spec_case(tmp_path_factory.mktemp("spec"), "paper")


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_ngram_speculation_matches_hf(name, spec_case, tmp_path):
    path, prompts, reference = spec_case if name == "paper" else _spec_case(tmp_path, name)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    tokens, stats = _fresh_process(vllm_greedy, path, prompts, 32, max_num_seqs=8, speculative_config=spec)
    assert stats["accepted_tokens"] > 0 and stats["rejected_steps"] > 0  # drafts were accepted, and rolled back
    assert _mismatches(tokens, reference) == []


def _llama_draft(target_dir: str, out) -> str:
    """A vanilla one-layer Llama with the target's first layer, norm and head (no shift): a draft vLLM's
    draft proposer accepts (all its layers attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvshift.models import KVShiftForCausalLM

    target = KVShiftForCausalLM.from_pretrained(target_dir)
    c = target.config
    draft = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=1, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, pad_token_id=256,
        bos_token_id=None, eos_token_id=256))
    draft.load_state_dict(target.state_dict(), strict=False)
    draft.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return str(out)


def test_draft_model_speculation_is_refused_naming_the_method(spec_case, tmp_path):
    """vLLM 0.32 addresses a draft model's KV cache through the target's first cache group; a kvshift model
    has several (attention, shift state) sharing memory, so the draft overwrote the target's keys and
    values (16 of 16 prompts decoded other tokens with a close one-layer draft). Refused at load."""
    path, prompts, _ = spec_case
    spec = {"model": _llama_draft(path, tmp_path / "draft"), "method": "draft_model", "num_speculative_tokens": 3}
    with pytest.raises(Exception, match="method='draft_model'"):
        _fresh_process(vllm_greedy, path, prompts[:2], 4, speculative_config=spec)


def test_speculation_with_prefix_caching_is_refused_on_cpu_naming_the_flag(spec_case):
    """vLLM's CPU build has no kernel for the state copies of speculative decoding with prefix caching: the
    engine would die at the first request, so the model refuses it at load, naming the flag."""
    path, prompts, _ = spec_case
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    with pytest.raises(Exception, match="--no-enable-prefix-caching"):
        _fresh_process(vllm_greedy, path, prompts[:2], 4, speculative_config=spec, enable_prefix_caching=True)


# -- tensor parallelism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,tp,want", [
    (4, 2, [(0, 2), (2, 2)]),            # sharded: two heads per rank
    (2, 2, [(0, 1), (1, 1)]),
    (1, 2, [(0, 1), (0, 1)]),            # replicated: both ranks hold the one head
    (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),
])
def test_kv_head_shard_is_vllms_qkv_sharding(total, tp, want):
    assert [kv_head_shard(total, tp, r) for r in range(tp)] == want


def test_kv_head_shard_refuses_uneven_splits():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        kv_head_shard(3, 2, 0)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        kv_head_shard(2, 3, 0)


TP_CASES = {"sharded": dict(num_key_value_heads=2), "replicated": dict(num_key_value_heads=1),
            # a sharded full layer and a sliding-window layer (8 tokens) with its own heads, its one KV head replicated
            "sliding-own-heads": dict(num_key_value_heads=2, sliding_window=8, num_swa_attention_heads=2,
                                      num_swa_key_value_heads=1, layer_types=["full_attention", "sliding_attention"])}


@pytest.mark.parametrize("name", list(TP_CASES))
def test_tensor_parallel_2_matches_hf(tmp_path, monkeypatch, name):
    """Two CPU ranks: each holds its KV heads' shift weights and state channels; the tokens equal HF's
    (and so TP=1's). Breaking the shard (every rank taking head 0's weights) makes this fail."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    path = _save(tmp_path / "ck", qk_norm=True, qkv_bias=True, max_position_embeddings=96, **TP_CASES[name])
    prompts = mixed_prompts(16, (1, 45))
    reference, _ = hf_greedy(path, prompts, 16)
    tokens, stats = vllm_greedy(path, prompts, 16, max_num_seqs=8, tensor_parallel_size=2)
    assert stats["max_running"] == 8
    assert _mismatches(tokens, reference) == []


def test_pipeline_parallelism_is_refused(tmp_path, monkeypatch):
    """The model does not implement vLLM's ``SupportsPP``: vLLM refuses it before loading, saying so."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    path = _save(tmp_path / "ck", num_key_value_heads=2, max_position_embeddings=96)
    with pytest.raises(NotImplementedError, match="Pipeline parallelism is not supported for this model"):
        vllm_greedy(path, [[1, 2, 3]], 2, pipeline_parallel_size=2)
