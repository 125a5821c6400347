"""Shared set-up of the Triton kernel tests in this folder: without a GPU the kernels run in Triton's CPU
interpreter (``TRITON_INTERPRET=1`` is set by the root conftest before anything imports triton; the kernels
module is re-wrapped here once). Tests take the module from the ``triton_kernels`` fixture, and the device
their tensors live on from ``triton_device``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if importlib.util.find_spec("triton") is not None:
    from builders import interpret_triton_kernels

    from kvshift.ops.kv_shift import triton as _kernels

    interpret_triton_kernels(_kernels)


@pytest.fixture(scope="session")
def triton_kernels():
    """``kvshift.ops.kv_shift.triton``, runnable here (interpreted on CPU); skips without Triton."""
    pytest.importorskip("triton")
    from kvshift.ops.kv_shift import triton as kernels

    return kernels


@pytest.fixture(scope="session")
def triton_device() -> str:
    return TRITON_DEVICE
