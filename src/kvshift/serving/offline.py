"""Greedy decoding of one checkpoint with vLLM's offline engine and with Hugging Face ``generate``, token
for token, plus the throughput benchmark behind ``kvshift bench vllm``.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler can be watched:
:func:`vllm_greedy` counts the preemptions and the most requests running at once, which is how the tests
know that continuous batching, chunked prefill and preemption really happened.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Sequence

import torch

__all__ = ["mixed_prompts", "hf_greedy", "vllm_greedy", "demo_checkpoint", "bench_vllm"]


def mixed_prompts(n: int = 32, lengths: tuple[int, int] = (1, 45), vocab: tuple[int, int] = (1, 256),
                  seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts, lengths uniform in ``lengths`` (inclusive), ids uniform in ``vocab``
    (half-open), from a seeded generator."""
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"lengths must satisfy 1 <= lo <= hi, got {lengths}")
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(vocab[0], vocab[1], (s,), generator=g).tolist() for s in sizes]


def _load_hf(model_dir: str):
    from ..models import KVShiftForCausalLM

    return KVShiftForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model_dir: str, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 1,
              model=None) -> tuple[list[list[int]], float]:
    """Greedy continuations (exactly ``max_new_tokens`` each) from ``generate`` in fp32, and the seconds it
    took. ``batch_size`` > 1 left-pads prompts into batches (the fast way to run HF ``generate``)."""
    model = model if model is not None else _load_hf(model_dir)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad)
        out += gen[:, width:].tolist()
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def _in_process_engine():
    """Run vLLM's engine core in this process (so its scheduler can be watched), whatever the caller set."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _watch_scheduler(stats: dict):
    """Count preemptions, the most requests running at once, the prompt tokens served from the prefix
    cache (summed over the scheduler's cache lookups) and, under speculative decoding, the draft tokens
    proposed and accepted, in vLLM's v1 scheduler."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    preempt, schedule, lookup = Scheduler._preempt_request, Scheduler.schedule, KVCacheManager.get_computed_blocks
    spec = Scheduler.make_spec_decoding_stats

    def counting_preempt(self, *args, **kwargs):
        stats["preemptions"] += 1
        return preempt(self, *args, **kwargs)

    def watching_schedule(self, *args, **kwargs):
        result = schedule(self, *args, **kwargs)
        stats["max_running"] = max(stats["max_running"], len(self.running))
        return result

    def counting_lookup(self, request, *args, **kwargs):
        found = lookup(self, request, *args, **kwargs)
        stats["prefix_cached_tokens"] += int(found[1])
        return found

    def counting_spec(self, spec_stats, num_draft_tokens, num_accepted_tokens, *args, **kwargs):
        stats["draft_tokens"] += int(num_draft_tokens)
        stats["accepted_tokens"] += int(num_accepted_tokens)
        stats["rejected_steps"] += int(num_accepted_tokens < num_draft_tokens)
        return spec(self, spec_stats, num_draft_tokens, num_accepted_tokens, *args, **kwargs)

    Scheduler._preempt_request, Scheduler.schedule = counting_preempt, watching_schedule
    KVCacheManager.get_computed_blocks, Scheduler.make_spec_decoding_stats = counting_lookup, counting_spec
    try:
        yield stats
    finally:
        Scheduler._preempt_request, Scheduler.schedule = preempt, schedule
        KVCacheManager.get_computed_blocks, Scheduler.make_spec_decoding_stats = lookup, spec


def vllm_greedy(model_dir: str, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                **engine_kwargs) -> tuple[list[list[int]], dict]:
    """Greedy continuations from vLLM's offline engine (fp32, eager, no prefix caching), and stats:
    ``preemptions``, ``max_running``, ``prefix_cached_tokens``, ``draft_tokens`` / ``accepted_tokens`` /
    ``rejected_steps`` (speculative decoding: drafts proposed, drafts accepted, verify steps that rejected
    at least one draft), ``seconds`` (generation only) and ``load_seconds``.

    ``engine_kwargs`` go to ``vllm.LLM`` (``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_chunked_prefill``, ``num_gpu_blocks_override``, ``block_size``, ``speculative_config``,
    ``tensor_parallel_size``, ...)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..models import KVShiftConfig

    config = KVShiftConfig.from_pretrained(str(model_dir))
    kwargs = dict(dtype="float32", max_model_len=config.max_position_embeddings, enforce_eager=True, seed=0,
                  enable_prefix_caching=False, skip_tokenizer_init=True)
    kwargs.update(engine_kwargs)
    stats = {"preemptions": 0, "max_running": 0, "prefix_cached_tokens": 0, "draft_tokens": 0, "accepted_tokens": 0,
             "rejected_steps": 0}
    with _in_process_engine(), _watch_scheduler(stats):
        t0 = time.perf_counter()
        llm = LLM(model=str(model_dir), **kwargs)
        stats["load_seconds"] = time.perf_counter() - t0
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens,
                                ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        results = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        stats["seconds"] = time.perf_counter() - t0
    tokens = [list(r.outputs[0].token_ids) for r in results]
    del llm
    _shutdown()
    return tokens, stats


def _shutdown() -> None:
    """Free the engine so another one can start in this process."""
    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def demo_checkpoint(path: str, seed: int = 0) -> str:
    """A seeded random kvshift checkpoint of a servable small shape (byte vocabulary, 4 layers, d 256, 4
    heads of 64) with its tokenizer, for the benchmark when no model is given."""
    from ..data.tokenizer import byte_tokenizer
    from ..models import KVShiftConfig, KVShiftForCausalLM

    torch.manual_seed(seed)
    config = KVShiftConfig(vocab_size=257, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                           pad_token_id=256, bos_token_id=None, eos_token_id=256)
    KVShiftForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def bench_vllm(model_dir: str, num_prompts: int = 32, max_new_tokens: int = 64, lengths: tuple[int, int] = (1, 45),
               hf_batch_sizes: tuple[int, ...] = (1, 8), max_num_seqs: int = 32) -> list[dict]:
    """Greedy generation of the same prompts by vLLM's engine (continuous batching, ``max_num_seqs``) and
    by HF ``generate`` (``hf_batch_sizes``: left-padded batches of these sizes, one prompt at a time for 1;
    empty to time vLLM alone), in this process: new tokens per second, each engine's speed over the first
    HF baseline, and how many prompts' tokens equal vLLM's (HF's batch-1 tokens are the exactness
    reference; left padding may change fp32 sums)."""
    from ..models import KVShiftConfig

    config = KVShiftConfig.from_pretrained(str(model_dir))
    room = config.max_position_embeddings - max_new_tokens  # prompt + new tokens must fit the model
    if room < lengths[0]:
        raise ValueError(f"--new-tokens {max_new_tokens} leaves no room for a prompt in this model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    prompts = mixed_prompts(num_prompts, (lengths[0], min(lengths[1], room)), vocab=(1, min(256, config.vocab_size)))
    vllm_tokens, stats = vllm_greedy(model_dir, prompts, max_new_tokens, max_num_seqs=max_num_seqs)
    new = num_prompts * max_new_tokens
    rows = []
    for b in hf_batch_sizes:
        tokens, seconds = hf_greedy(model_dir, prompts, max_new_tokens, batch_size=b)
        rows.append({"bench": "vllm", "engine": f"hf generate, batch {b}", "seconds": seconds,
                     "tok_per_s": new / seconds,
                     "same_tokens_as_vllm": f"{sum(a == c for a, c in zip(tokens, vllm_tokens))}/{num_prompts}"})
    rows.append({"bench": "vllm", "engine": f"vllm LLM.generate, max_num_seqs {max_num_seqs}",
                 "seconds": stats["seconds"], "tok_per_s": new / stats["seconds"],
                 "same_tokens_as_vllm": f"{num_prompts}/{num_prompts}"})
    if hf_batch_sizes:  # speed over the first HF baseline (batch 1 by default); no ratio when none was timed
        column = f"vs_hf_batch{hf_batch_sizes[0]}"
        for r in rows:
            r[column] = r["tok_per_s"] / rows[0]["tok_per_s"]
    for r in rows:
        r.update(prompts=num_prompts, new_tokens_each=max_new_tokens)
    rows[-1]["load_s"] = stats["load_seconds"]
    return rows
