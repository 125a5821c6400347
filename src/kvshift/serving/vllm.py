"""The vLLM plugin: ``register()`` runs in every vLLM process (entry point ``vllm.general_plugins``).

It registers ``KVShiftConfig`` with ``AutoConfig`` (so vLLM can read a kvshift ``config.json``) and the
model class under the architecture name that ``save_pretrained`` writes, ``KVShiftForCausalLM``; the
model module is imported lazily, when such a checkpoint is loaded. It also keeps vLLM's hybrid-model rule
from mistaking a kvshift config's ``layer_types`` for a model without state (``_keep_hybrid``).
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
    _keep_hybrid()


def _keep_hybrid() -> None:
    """Keep vLLM treating a kvshift model as the hybrid (attention + state) model it is.

    vLLM 0.32's ``ModelConfig.is_hybrid`` says False for a model whose config lists ``layer_types`` that are
    all ``"full_attention"`` (for IBM Granite configs that name a hybrid class but have no state layers), and
    a kvshift config lists its layers' types as transformers does, so a model without sliding-window layers
    would lose its shift-state cache. For kvshift's architecture the model class decides, as it does for
    configs without ``layer_types``; every other model keeps vLLM's rule.
    """
    from vllm.config.model import ModelConfig

    rule = ModelConfig.__dict__.get("is_hybrid")
    if not isinstance(rule, property) or getattr(rule.fget, "_kvshift", False):
        return

    def is_hybrid(self) -> bool:
        if ARCHITECTURE in (getattr(self.hf_config, "architectures", None) or []):
            return bool(self._model_info.is_hybrid)
        return rule.fget(self)

    is_hybrid._kvshift = True
    ModelConfig.is_hybrid = property(is_hybrid, doc=rule.__doc__)
