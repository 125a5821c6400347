"""The GPU check's probe: the few things a first GPU run must show, most valuable first, one row each.

``kvshift bench probe`` (step 1 of ``scripts/gpu_check.sh``): the fused kernel past 2^31 elements, one bf16
training step of a tiny model on FlexAttention with packed rows (Triton against the torch backend), prefill
+ decode under autocast with static and dynamic caches, the compiled static-cache decode step with no CUDA
graph skipped, and the fused kernel's bandwidth against ``x.clone()``. ``dry_run``: the same steps on CPU at
tiny shapes (Triton in its interpreter, SDPA where FlexAttention has no CPU backward, the compiled step
checked by graph inspection instead of CUDA graphs).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator

import torch

from .common import time_fn

__all__ = ["CHECKS", "run_probe"]

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
             pad_token_id=None, tie_word_embeddings=True)


def _tiny_model(device, backend: str, impl: str, seed: int = 0, **overrides):
    from ..models import KVShiftConfig, KVShiftForCausalLM

    torch.manual_seed(seed)
    cfg = KVShiftConfig(**{**_TINY, **overrides}, kv_shift=True)
    cfg._attn_implementation = impl
    model = KVShiftForCausalLM(cfg).to(device)
    with torch.no_grad():  # weights off the identity: the shift is exercised
        for layer in model.model.layers:
            layer.self_attn.k_shift.copy_(torch.randn_like(layer.self_attn.k_shift))
            layer.self_attn.v_shift.copy_(torch.randn_like(layer.self_attn.v_shift))
            layer.self_attn.kv_shift_backend = backend
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``|a - b| / |b|`` in fp32 (norms)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_offsets(device: torch.device, dry_run: bool) -> dict:
    """The fused shift + RoPE, forward and backward, on a tensor past 2^31 elements (64-bit offsets): its last
    tokens against the reference on a slice."""
    from ..ops.kv_shift import kv_shift_ref
    from ..ops.kv_shift.triton import kv_shift_rope_triton
    from ..ops.rope import apply_rope, rope_cos_sin, rope_inv_freq

    H, D = (2, 16) if dry_run else (8, 128)
    T = 64 if dry_run else (2**31) // (H * D) + 64  # 2^31 + 64 * H * D elements
    dtype = torch.float32 if dry_run else torch.bfloat16
    x = torch.empty(1, T, H, D, device=device, dtype=dtype)
    x[:, -8:].normal_()
    x[:, :-8].fill_(0.5)
    x.requires_grad_()
    w = torch.randn(H, 2, device=device)
    cos, sin = rope_cos_sin(torch.arange(T, device=device)[None], rope_inv_freq(D, 10000.0, device), dtype)
    y = kv_shift_rope_triton(x, w, cos, sin)  # [1, H, T, D]
    g = torch.zeros_like(y)
    g[:, :, -4:] = 1.0
    (gx,) = torch.autograd.grad(y, x, g)
    xs = x.detach()[:, -5:].clone().requires_grad_()
    ref = apply_rope(kv_shift_ref(xs[:, 1:], w, prev=xs[:, 0]), cos[:, -4:], sin[:, -4:]).transpose(1, 2)
    (gref,) = torch.autograd.grad(ref, xs, g[:, :, -4:])
    err_y, err_g = _rel(y[:, :, -4:], ref), _rel(gx[:, -5:], gref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"elements": x.numel(), "over_2^31": x.numel() > 2**31, "err_out": err_y, "err_grad": err_g,
            "ok": err_y < tol and err_g < tol}


def _packed_batch(device, B: int, T: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    cut = T // 3  # row 0 packs two documents, row 1 holds one
    pos = torch.stack([torch.cat([torch.arange(cut), torch.arange(T - cut)]), torch.arange(T)])
    return ids.to(device), pos.to(device)


def check_train_step(device: torch.device, dry_run: bool) -> dict:
    """One bf16-autocast training step of a tiny model on packed rows, Triton against the torch backend: loss
    and every gradient. FlexAttention (the trainer's CUDA default, a BlockMask) on a GPU; SDPA in a dry run."""
    impl = "sdpa" if dry_run else "flex_attention"
    T = 32 if dry_run else 256
    ids, pos = _packed_batch(device, 2, T, _TINY["vocab_size"])
    out = {}
    for backend in ("torch", "triton"):
        model = _tiny_model(device, backend, impl).train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        out[backend] = (loss.detach().float(), {n: p.grad for n, p in model.named_parameters()})
    err_loss = abs(float(out["triton"][0] - out["torch"][0]))
    err_grad = max(_rel(out["triton"][1][n], g) for n, g in out["torch"][1].items())
    return {"attn": impl, "loss": float(out["torch"][0]), "err_loss": err_loss, "max_rel_err_grad": err_grad,
            "ok": err_loss < 2e-2 and err_grad < 5e-2}


@torch.no_grad()
def check_decode(device: torch.device, dry_run: bool) -> dict:
    """Prefill + token-by-token decode under bf16 autocast (the fused kernel, then the decode step) with a
    static and a dynamic cache: logits against the full forward, one cache dtype (bf16)."""
    from transformers import DynamicCache, StaticCache

    model = _tiny_model(device, "triton", "sdpa").eval()
    T, P = (12, 8) if dry_run else (64, 48)
    ids = torch.randint(0, _TINY["vocab_size"], (2, T), device=device)
    row: dict = {"ok": True}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        full = model(ids, use_cache=False).logits.float()
        for kind in ("static", "dynamic"):
            cache = StaticCache(config=model.config, max_cache_len=T) if kind == "static" else DynamicCache(
                config=model.config)
            logits = [model(ids[:, :P], cache=cache, use_cache=True).logits.float()]
            for t in range(P, T):
                pos = torch.full((2, 1), t, device=device)
                logits.append(model(ids[:, t:t + 1], cache=cache, position_ids=pos, use_cache=True).logits.float())
            dtypes = {str(t.dtype).removeprefix("torch.") for layer in cache.layers for t in (layer.keys, layer.values)}
            err = _rel(torch.cat(logits, 1), full)
            row[f"{kind}_err"], row[f"{kind}_cache_dtype"] = err, "/".join(sorted(dtypes))
            row["ok"] = row["ok"] and err < 3e-2 and dtypes == {"bfloat16"}
    return row


@torch.no_grad()
def check_compiled_decode(device: torch.device, dry_run: bool) -> dict:
    """The static-cache decode step under ``torch.compile(fullgraph=True)`` with position_ids (as generate()
    passes them): on a GPU with CUDA graphs ("reduce-overhead"), counting Inductor's CUDA-graph skips; in a
    dry run, the AOT graph through Inductor's CUDA-graph check."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    torch._dynamo.reset()
    model = _tiny_model(device, "auto" if not dry_run else "torch", "sdpa").eval().to(torch.bfloat16)
    graphs: list = []
    if dry_run:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        step = torch.compile(model, fullgraph=True, dynamic=False, backend=aot_autograd(fw_compiler=keep))
    else:
        step = torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead")
    P, N = (6, 3) if dry_run else (32, 8)
    ids = torch.randint(0, _TINY["vocab_size"], (2, P + N), device=device)
    caches = [StaticCache(config=model.config, max_cache_len=P + N) for _ in range(2)]
    for cache in caches:
        model(ids[:, :P], cache=cache, use_cache=True)
    before = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
    errs = []
    for t in range(P, P + N):
        pos = torch.full((2, 1), t, device=device)
        got = step(ids[:, t:t + 1], cache=caches[0], position_ids=pos, use_cache=True).logits.float().clone()
        ref = model(ids[:, t:t + 1], cache=caches[1], position_ids=pos, use_cache=True).logits.float()
        errs.append(_rel(got, ref))
    skips = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)) - before
    if dry_run:
        from torch._inductor.utils import get_first_incompatible_cudagraph_node

        skips = sum(get_first_incompatible_cudagraph_node(gm) is not None for gm in graphs)
    return {"mode": "aot graph check" if dry_run else "reduce-overhead", "cudagraph_skips": skips,
            "max_rel_err": max(errs), "ok": skips == 0 and max(errs) < 3e-2}


@torch.no_grad()
def check_bandwidth(device: torch.device, dry_run: bool) -> dict:
    """GB/s of the fused shift + RoPE + layout change (reads x, writes y) against ``x.clone()`` (the copy
    bound) on keys ``[8, 4096, 8, 128]`` bf16."""
    from ..ops.kv_shift import kv_shift_rope
    from ..ops.rope import rope_cos_sin, rope_inv_freq

    B, T, H, D = (2, 16, 2, 16) if dry_run else (8, 4096, 8, 128)
    dtype = torch.float32 if dry_run else torch.bfloat16
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    w = torch.randn(H, 2, device=device)
    pos = torch.arange(T, device=device)[None].expand(B, T)
    cos, sin = rope_cos_sin(pos[:1], rope_inv_freq(D, 10000.0, device), dtype)
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
    warmup, iters = (1, 2) if dry_run else (10, 50)
    fused = time_fn(lambda: kv_shift_rope(x, w, cos, sin, backend="triton"), warmup, iters, device)
    clone = time_fn(lambda: x.clone(), warmup, iters, device)
    moved = 2 * x.numel() * x.element_size()  # read x + write y (cos/sin: one row, cached)
    return {"shape": f"{B}x{T}x{H}x{D}", "fused_ms": fused, "clone_ms": clone, "fused_gbps": moved / fused / 1e6,
            "clone_gbps": moved / clone / 1e6, "fused_over_clone": clone / fused, "ok": True}


CHECKS: dict[str, Callable[[torch.device, bool], dict]] = {
    "offsets_2^31": check_offsets,
    "train_step_flex_bf16_packed": check_train_step,
    "prefill_decode_autocast": check_decode,
    "compiled_static_decode": check_compiled_decode,
    "fused_bandwidth": check_bandwidth,
}


def run_probe(device: torch.device, dry_run: bool = False, names: list[str] | None = None) -> Iterator[dict]:
    """One row per check, as each one finishes (a failing check is a row with ``ok: False`` and its error)."""
    for name in names or list(CHECKS):
        t0 = time.perf_counter()
        try:
            row = CHECKS[name](device, dry_run)
        except Exception as err:  # a failing check must not hide the ones after it
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"[:400],
                   "where": traceback.format_exc(limit=-2).strip().splitlines()[-3][:200]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield {"bench": "probe", "check": name, **row, "seconds": time.perf_counter() - t0}
