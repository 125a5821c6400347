"""Layer, training-step and decode benchmarks: KV shifting against vanilla attention, interleaved in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..models import KVShiftConfig, KVShiftForCausalLM

__all__ = ["interleaved", "bench_layer", "bench_train_step", "bench_decode", "CPU_MODEL", "GPU_MODEL", "TINY_MODEL"]

# Small model for a 2-core CPU; GPT-2-small class for a GPU (issue targets).
CPU_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, batch=8, seq=256)
# Tiny shapes for tests and the GPU check's CPU rehearsal (`bash scripts/gpu_check.sh --dry-run`)
TINY_MODEL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, batch=2, seq=16)
GPU_MODEL = dict(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, batch=32, seq=1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int) -> dict:
    """Median ms per call of each fn, measured round-robin (order alternating) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            _sync(device)
            t = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _config(spec: dict, kv_shift: bool) -> KVShiftConfig:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    return KVShiftConfig(**{k: spec[k] for k in keys}, max_position_embeddings=spec["seq"] + 64,
                         kv_shift=kv_shift, tie_word_embeddings=True, use_cache=False,
                         bos_token_id=None, eos_token_id=None)


def _models(spec: dict, device, dtype) -> dict[str, KVShiftForCausalLM]:
    out = {}
    for name, flag in (("vanilla", False), ("kvshift", True)):
        torch.manual_seed(0)
        out[name] = KVShiftForCausalLM(_config(spec, flag)).to(device=device, dtype=dtype)
    return out


def _causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)


def bench_layer(spec: dict, device: torch.device, dtype: torch.dtype, warmup: int = 3, rounds: int = 20,
                impls: tuple[str, ...] = ("sdpa", "flex_attention")) -> list[dict]:
    """One decoder layer (attention + MLP), KV shifting vs vanilla, one row per attention backend: SDPA (the
    model's default) and FlexAttention (the trainer's CUDA default) with a causal BlockMask. Forward and
    backward; FlexAttention on CPU has no backward (torch 2.13), so its CPU row times the forward alone."""
    from ..layers.block import DecoderLayer
    from ..ops.rope import rope_cos_sin, rope_inv_freq

    B, T = spec["batch"], spec["seq"]
    rows = []
    for impl in impls:
        backward = impl != "flex_attention" or device.type == "cuda"
        mask = _causal_block_mask(T, device) if impl == "flex_attention" else None
        fns = {}
        for name, flag in (("vanilla", False), ("kvshift", True)):
            cfg = _config(spec, flag)
            cfg._attn_implementation = impl
            torch.manual_seed(0)
            layer = DecoderLayer(cfg, 0).to(device=device, dtype=dtype)
            x = torch.randn(B, T, cfg.hidden_size, device=device, dtype=dtype, requires_grad=backward)
            pos = torch.arange(T, device=device)[None].expand(B, T)
            cos_sin = rope_cos_sin(pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta, device), dtype)

            def fn(layer=layer, x=x, cos_sin=cos_sin):
                if backward:
                    layer(x, cos_sin, mask).sum().backward()
                else:
                    with torch.no_grad():
                        layer(x, cos_sin, mask)

            fns[name] = fn
        ms = interleaved(fns, device, warmup, rounds)
        rows.append({"bench": "layer", "attn": impl, "pass": "fwd+bwd" if backward else "fwd",
                     "vanilla_ms": ms["vanilla"], "kvshift_ms": ms["kvshift"], "ratio": ms["kvshift"] / ms["vanilla"]})
    return rows


def bench_train_step(spec: dict, device: torch.device, dtype: torch.dtype | None = None, warmup: int = 3,
                     rounds: int = 20, compile: bool = False, compile_backend: str = "inductor") -> dict:
    """A full AdamW training step (forward, backward, optimizer); tokens/s of KV shifting over vanilla
    (``compile``: the model under ``torch.compile`` with ``compile_backend``)."""
    B, T = spec["batch"], spec["seq"]
    models = _models(spec, device, torch.float32)
    use_bf16 = dtype == torch.bfloat16
    x = torch.randint(0, spec["vocab_size"], (B, T), device=device)
    fns = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = torch.compile(model, backend=compile_backend) if compile else model

        def fn(fwd=fwd, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = fwd(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = fn
    ms = interleaved(fns, device, warmup, rounds)
    tok = B * T
    row = {"bench": "train_step", "batch": B, "seq": T, "vanilla_ms": ms["vanilla"], "kvshift_ms": ms["kvshift"],
           "vanilla_tokens_per_s": tok / ms["vanilla"] * 1e3, "kvshift_tokens_per_s": tok / ms["kvshift"] * 1e3}
    row["throughput_ratio"] = row["kvshift_tokens_per_s"] / row["vanilla_tokens_per_s"]
    row["time_ratio"] = ms["kvshift"] / ms["vanilla"]
    if device.type == "cuda":
        for name, fn in fns.items():
            # memory a step adds on top of what is allocated (both models, their optimizer states):
            # activations and gradients, where the raw K/V that KV shifting saves show up
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            row[f"{name}_step_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        row["step_memory_ratio"] = row["kvshift_step_gib"] / row["vanilla_step_gib"]
        n = sum(p.numel() for p in models["vanilla"].parameters())
        flops = 6 * n * tok + 12 * spec["num_hidden_layers"] * spec["hidden_size"] * T * tok  # PaLM-style count
        peak = 989e12  # H100/H200 dense bf16
        row["vanilla_mfu"] = flops / (ms["vanilla"] / 1e3) / peak
    return row


@torch.no_grad()
def bench_decode(spec: dict, device: torch.device, dtype: torch.dtype, batch_sizes=(1, 32), prompt: int = 128,
                 new_tokens: int = 32, rounds: int = 5, compile: bool = False,
                 compile_backend: str = "inductor") -> list[dict]:
    """Per-token decode latency with the KV cache after an untimed ``prompt``-token prefill.

    Both models decode side by side, one step each in alternating order, so machine drift hits both
    alike; the median over every step of every round is reported. ``compile=True`` decodes with a
    static cache and a ``torch.compile(fullgraph=True)`` step (with CUDA graphs on a GPU);
    otherwise eager with a ``DynamicCache``.
    """
    from transformers import DynamicCache, StaticCache

    models = {name: m.eval() for name, m in _models(spec, device, dtype).items()}
    # CUDA graphs on a GPU (Inductor only)
    mode = "reduce-overhead" if device.type == "cuda" and compile_backend == "inductor" else None
    steps_fn = {name: torch.compile(m, fullgraph=True, dynamic=False, mode=mode, backend=compile_backend)
                if compile else m for name, m in models.items()}
    rows = []
    for B in batch_sizes:
        ids = torch.randint(0, spec["vocab_size"], (B, prompt), device=device)
        nxt = torch.randint(0, spec["vocab_size"], (B, 1), device=device)
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(rounds + 1):  # round 0 warms up (and compiles)
            caches = {}
            for name, model in models.items():
                caches[name] = (StaticCache(config=model.config, max_cache_len=prompt + new_tokens) if compile
                                else DynamicCache(config=model.config))
                model(ids, cache=caches[name], use_cache=True)
            for i in range(new_tokens):
                pos = torch.full((B, 1), prompt + i, device=device)
                for name in models if (r + i) % 2 == 0 else reversed(models):
                    _sync(device)
                    t = time.perf_counter()
                    steps_fn[name](nxt, cache=caches[name], position_ids=pos, use_cache=True)
                    _sync(device)
                    if r > 0:
                        times[name].append((time.perf_counter() - t) * 1e3)
        per_tok = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"bench": "decode", "mode": "compiled, static cache" if compile else "eager, dynamic cache",
                     "batch": B, "prompt": prompt, "vanilla_ms_per_token": per_tok["vanilla"],
                     "kvshift_ms_per_token": per_tok["kvshift"], "ratio": per_tok["kvshift"] / per_tok["vanilla"]})
    return rows
