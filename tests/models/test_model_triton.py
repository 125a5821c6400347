"""The model with its Triton kernels (shift + RoPE + layout, fused) equals the eager-PyTorch model.

On CPU the kernels run under the Triton interpreter; with CUDA they run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from builders import interpret_triton_kernels, tiny_model  # noqa: E402

from kvshift.ops.kv_shift import triton as kernels  # noqa: E402

interpret_triton_kernels(kernels)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _set_backend(model, backend: str):
    for layer in model.model.layers:
        layer.self_attn.kv_shift_backend = backend
    return model


@pytest.mark.parametrize("position", ["pre_rope", "post_rope"])
def test_forward_and_gradients_match_eager(position):
    """Left padding, a packed row (position ids restarting) and every parameter's gradient."""
    models = {b: _set_backend(tiny_model(kv_shift_position=position).to(DEVICE).train(), b)
              for b in ("torch", "triton")}
    ids = torch.randint(3, 97, (2, 11), device=DEVICE)
    mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    pos = torch.tensor([list(range(11)), [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]], device=DEVICE)
    out = {}
    for b, m in models.items():
        loss = m(input_ids=ids, attention_mask=mask, position_ids=pos, labels=ids).loss
        loss.backward()
        out[b] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    for name, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert out["triton"][1]["model.layers.0.self_attn.k_shift"].abs().sum() > 0


@torch.no_grad()
def test_chunked_prefill_and_decode_match_full_forward():
    m = _set_backend(tiny_model().to(DEVICE), "triton")
    ids = torch.randint(3, 97, (2, 12), device=DEVICE)
    full = m(ids).logits
    out = m(ids[:, :5], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    logits.append(m(ids[:, 5:9], past_key_values=cache, use_cache=True).logits)  # a chunk: fused kernel + prev
    for t in range(9, 12):  # decode steps
        logits.append(m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_compiled_model_with_triton_kernels_matches_eager():
    """torch.compile(fullgraph=True) traces the dispatch into the fused custom ops (no graph break)."""
    torch._dynamo.reset()
    m = _set_backend(tiny_model().to(DEVICE).train(), "triton")
    ids = torch.randint(3, 97, (2, 9), device=DEVICE)
    eager = m(input_ids=ids, labels=ids).loss
    eager_grad = torch.autograd.grad(eager, m.model.layers[0].self_attn.k_shift)[0]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids).loss
    compiled_grad = torch.autograd.grad(compiled, m.model.layers[0].self_attn.k_shift)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-4)
