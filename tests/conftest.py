"""Shared fixtures: tiny configs and models built in the test itself (no downloads)."""

from __future__ import annotations

import os
import sys

import torch

# Triton kernels run on CPU through the interpreter; the flag must be set before anything imports
# triton (transformers does, through torch._inductor).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# tests/ mirrors src/kvshift/ (ops, layers, models, data, ...); the test modules are not packages, so the
# shared builders of one folder (e.g. models/test_hf_auto.save_tiny) import by module name from any other
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _sub in sorted(os.listdir(_TESTS)):
    if os.path.isdir(os.path.join(_TESTS, _sub)) and not _sub.startswith((".", "_")):
        sys.path.append(os.path.join(_TESTS, _sub))

# Test tensors are tiny: one thread avoids OpenMP spin contention on a shared 2-core machine.
torch.set_num_threads(1)

import kvshift  # noqa: E402,F401  (registers the Auto classes)
from kvshift import KVShiftConfig, KVShiftForCausalLM  # noqa: E402


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


@pytest.fixture
def make_model():
    return tiny_model


_TIMEOUT = int(os.environ.get("KVSHIFT_TEST_TIMEOUT", "0") or 0)  # seconds per test; 0 = none


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """``KVSHIFT_TEST_TIMEOUT=N``: fail a test that runs longer than N seconds (the GPU check sets it, so
    one hung test cannot eat a short device slot). SIGALRM, main thread only; a no-op otherwise."""
    import signal
    import threading

    if not _TIMEOUT or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past KVSHIFT_TEST_TIMEOUT={_TIMEOUT}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
