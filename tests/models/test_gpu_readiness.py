"""What the first GPU run needs, checked on CPU (issue 28): one cache dtype under bf16 autocast, one dtype into
every attention backend, a compiled static-cache decode graph CUDA graphs accept, the causal path in
generate. Triton kernels run in the CPU interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from builders import interpret_triton_kernels, tiny_model  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

import kvshift.layers.attention as attention_layer  # noqa: E402
from kvshift.models import modeling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = pytest.importorskip("triton") is not None
from kvshift.ops.kv_shift import triton as kernels  # noqa: E402

interpret_triton_kernels(kernels)

# (kv_shift, kv_shift_backend): vanilla, the eager shift, the fused Triton kernel
VARIANTS = {"vanilla": (False, "torch"), "torch": (True, "torch"), "triton": (True, "triton")}


def _model(variant: str, **overrides):
    kv_shift, backend = VARIANTS[variant]
    m = tiny_model(kv_shift=kv_shift, **overrides).to(DEVICE)
    for layer in m.model.layers:
        layer.self_attn.kv_shift_backend = backend
    return m


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def _cache_dtypes(cache) -> set[torch.dtype]:
    return {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_bf16_autocast_decode_keeps_one_cache_dtype(variant, cache_kind):
    """Prefill (fused kernel on the Triton path) then decode steps (the step op + RoPE in fp32 cos/sin): every
    cached key and value stays bf16. Before: the Triton path's static cache failed in index_copy_ and its
    dynamic cache turned fp32; the eager paths cached fp32 keys beside bf16 values."""
    m = _model(variant)
    ids = torch.randint(3, 97, (2, 7), device=DEVICE)
    cache = (StaticCache(config=m.config, max_cache_len=16) if cache_kind == "static"
             else DynamicCache(config=m.config))
    with _autocast():
        m(ids[:, :5], cache=cache, use_cache=True)
        assert _cache_dtypes(cache) == {torch.bfloat16}
        for t in (5, 6):
            pos = torch.full((2, 1), t, device=DEVICE)
            m(ids[:, t:t + 1], cache=cache, position_ids=pos, use_cache=True)
    assert _cache_dtypes(cache) == {torch.bfloat16}


def _record_backend(monkeypatch) -> list[tuple]:
    """Patch the layer's backend lookup: every call records ``(q, k, v)`` dtypes and the mask, then runs."""
    seen = []
    real = attention_layer.attention_backend

    def lookup(name):
        fn = real(name)

        def recording(module, q, k, v, mask, **kwargs):
            seen.append((q.dtype, k.dtype, v.dtype, mask))
            return fn(module, q, k, v, mask, **kwargs)

        return recording

    monkeypatch.setattr(attention_layer, "attention_backend", lookup)
    return seen


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_backend_gets_one_dtype_under_autocast(variant, impl, monkeypatch):
    """Training forward on packed rows, prefill and a decode step under bf16 autocast: q, k and v reach the
    attention backend in bf16 (before: q, and k off the fused kernel, were fp32)."""
    if impl == "flex_attention":
        # a clean compile state: after other flex tests, dynamo recompiles with dynamic shapes, whose bf16 CPU
        # kernel Inductor (torch 2.13) fails to compile (`cur_qSplitSize1` undeclared), unrelated to kvshift
        torch._dynamo.reset()
    seen = _record_backend(monkeypatch)
    m = _model(variant)
    m.config._attn_implementation = impl
    ids = torch.randint(3, 97, (2, 8), device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))], device=DEVICE)
    with _autocast():
        if impl != "flex_attention":  # FlexAttention has no backward on CPU (torch 2.13)
            m.train()(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        m.eval()
        with torch.no_grad():
            m(ids, position_ids=pos, use_cache=False)
            cache = DynamicCache(config=m.config)
            m(ids[:, :6], cache=cache, use_cache=True)
            m(ids[:, 6:7], cache=cache, position_ids=torch.full((2, 1), 6, device=DEVICE), use_cache=True)
    assert seen
    for q, k, v, _ in seen:
        assert (q, k, v) == (torch.bfloat16,) * 3


def _capturing_backend(graphs: list):
    """A torch.compile backend that keeps every AOT (aten-level) forward graph and runs it as is."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep)


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_compiled_static_decode_graph_is_cuda_graph_safe(variant):
    """The fullgraph-compiled static-cache decode step, with position_ids as generate() and `bench gpu-decode`
    pass them, under bf16 autocast: no ``_local_scalar_dense`` (a host sync, which makes Inductor skip CUDA
    graphs) and no node Inductor's CUDA-graph check rejects; bf16 cache, logits equal the eager step."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    torch._dynamo.reset()
    m = _model(variant)
    ids = torch.randint(3, 97, (2, 6), device=DEVICE)
    caches = [StaticCache(config=m.config, max_cache_len=12) for _ in range(2)]
    graphs: list = []
    step = torch.compile(m, fullgraph=True, dynamic=False, backend=_capturing_backend(graphs))
    with _autocast():
        for cache in caches:
            m(ids[:, :5], cache=cache, use_cache=True)
        pos = torch.full((2, 1), 5, device=DEVICE)
        compiled = step(ids[:, 5:6], cache=caches[0], position_ids=pos, use_cache=True).logits
        eager = m(ids[:, 5:6], cache=caches[1], position_ids=pos, use_cache=True).logits
    assert graphs
    for gm in graphs:
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any("_local_scalar_dense" in op for op in ops), sorted(ops)
        assert get_first_incompatible_cudagraph_node(gm) is None
    assert _cache_dtypes(caches[0]) == {torch.bfloat16}
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)


@torch.no_grad()
def test_generate_takes_the_causal_path(monkeypatch):
    """generate() passes position_ids, which never start a document there: no document mask. Left padded
    on CPU (its positions restart after the padding), and unpadded with the reset mask kept as on a GPU
    (where reading it would sync): no and-mask, and SDPA gets no mask at all (is_causal, the flash path).
    The tokens equal generation with the document masks as before. (FlexAttention generate with a padded
    cache fails in Inductor's CPU code generation, torch 2.13: SDPA only.)"""
    m = _model("torch")
    m.config._attn_implementation = "sdpa"
    make_calls = []
    real_make = modeling.create_causal_mask

    def spy(**kwargs):
        make_calls.append("and_mask_function" in kwargs)
        return real_make(**kwargs)

    ids = torch.randint(3, 97, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ref = m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    monkeypatch.setattr(modeling, "create_causal_mask", spy)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert make_calls and not any(make_calls)
    assert torch.equal(out, ref)

    monkeypatch.setattr(modeling, "_host_readable", lambda t: False, raising=False)  # as on a GPU
    seen = _record_backend(monkeypatch)
    make_calls.clear()
    m.generate(ids, max_new_tokens=3, do_sample=False)
    assert make_calls and not any(make_calls)
    assert seen and all(mk is None for *_, mk in seen)
    # an explicitly packed row still gets its document mask on that path
    make_calls.clear()
    m(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2, device=DEVICE), use_cache=False)
    assert make_calls == [True]


@pytest.mark.parametrize("variant", ["torch", "triton"])
def test_keep_mask_is_built_once_per_forward(variant, monkeypatch):
    """Padding and a packed row: one keep mask for every layer's K and V (it was rebuilt per tensor and layer,
    ~50 us of host time each), and the outputs and gradients equal the per-call masks of the reference."""
    import sys

    import kvshift.layers.attention as layer_module

    # by sys.modules: kvshift.ops.kv_shift, as an attribute, is the op function that shadows its package
    op_module, torch_module = sys.modules["kvshift.ops.kv_shift"], sys.modules["kvshift.ops.kv_shift.pytorch"]

    m = _model(variant, num_hidden_layers=3).train()
    ref = _model(variant, num_hidden_layers=3).train()
    for layer in ref.model.layers:
        layer.self_attn.kv_shift_backend = "reference"
    calls = []
    real = op_module.previous_token_keep_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (modeling, layer_module, op_module, torch_module):
        monkeypatch.setattr(module, "previous_token_keep_mask", counting, raising=False)
    ids = torch.randint(3, 97, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = torch.tensor([list(range(9)), [0, 1, 2, 3, 0, 1, 2, 3, 4]], device=DEVICE)
    out = m(input_ids=ids, attention_mask=mask, position_ids=pos, labels=ids)
    assert len(calls) == 1
    expected = ref(input_ids=ids, attention_mask=mask, position_ids=pos, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
