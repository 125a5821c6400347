"""The vLLM plugin: ``register()`` runs in every vLLM process (entry point ``vllm.general_plugins``).

It registers ``KVShiftConfig`` with ``AutoConfig`` (so vLLM can read a kvshift ``config.json``) and the
model class under the architecture name that ``save_pretrained`` writes, ``KVShiftForCausalLM``; the
model module is imported lazily, when such a checkpoint is loaded.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE", "register"]

ARCHITECTURE = "KVShiftForCausalLM"
MODEL_CLASS = "kvshift.serving.vllm_model:KVShiftForCausalLM"


def register() -> None:
    """Register the kvshift model with vLLM's ``ModelRegistry`` (idempotent)."""
    from vllm import ModelRegistry

    from .. import models  # noqa: F401  registers KVShiftConfig with AutoConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
