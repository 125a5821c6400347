"""Shared test builders: tiny configs and models built in the test itself (no downloads), and the Triton
interpreter re-wrap. Import with ``from builders import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

import torch

from kvshift import KVShiftConfig, KVShiftForCausalLM

__all__ = ["tiny_config", "tiny_model", "interpret_triton_kernels", "left_pad"]


def interpret_triton_kernels(*modules) -> None:
    """Re-wrap the ``@triton.jit`` functions of ``modules`` for the CPU interpreter (no-op with CUDA).

    ``triton.jit`` picks compiled or interpreted at decoration time. When ``triton.language`` was
    imported before ``TRITON_INTERPRET=1`` was set (e.g. ``import transformers`` pulls in
    ``torch._inductor``, which imports triton), its ``tl.sum`` and our kernels are compiled-only
    functions that cannot run on CPU tensors.
    """
    if torch.cuda.is_available():
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for module in (tl, tl.standard, *modules):
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                setattr(module, name, InterpretedFunction(obj.fn))


def tiny_config(**overrides) -> KVShiftConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return KVShiftConfig(**base)


def tiny_model(seed: int = 0, randomize_shift: bool = True, **overrides) -> KVShiftForCausalLM:
    torch.manual_seed(seed)
    model = KVShiftForCausalLM(tiny_config(**overrides)).eval()
    if randomize_shift:  # weights off the convex line, some negative: the general case
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                if attn.use_kv_shift:
                    attn.k_shift.copy_(torch.randn_like(attn.k_shift))
                    attn.v_shift.copy_(torch.randn_like(attn.v_shift))
    return model


def left_pad(seqs: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[len(seqs), longest]`` with every sequence right-aligned after ``pad``
    tokens (a non-zero ``pad`` is a real token id, whose projections are not zero)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return ids, mask
