"""Root fixtures and set-up: the Triton interpreter on CPU, test folders on sys.path, one thread, a per-test
timeout. Shared builders (tiny configs and models, no downloads) are in tests/builders.py: import them from
there, never from a conftest (pytest loads several conftest modules under the same name)."""

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

from builders import tiny_model  # noqa: E402  (shared builders live in tests/builders.py, not here)

import kvshift  # noqa: E402,F401  (registers the Auto classes)


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
