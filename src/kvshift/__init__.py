"""kvshift: KV shifting attention (Xu et al., ICML 2025) as a PyTorch op and a Hugging Face model.

Importing kvshift registers the ``kvshift`` model type with the Hugging Face Auto classes.
"""

from .models import KVShiftConfig, KVShiftForCausalLM, KVShiftModel, KVShiftPreTrainedModel
from .ops import kv_shift, kv_shift_ref

__version__ = "0.1.0"
__all__ = ["kv_shift", "kv_shift_ref", "KVShiftConfig", "KVShiftForCausalLM", "KVShiftModel",
           "KVShiftPreTrainedModel", "__version__"]


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register("kvshift", KVShiftConfig)
        AutoModel.register(KVShiftConfig, KVShiftModel)
        AutoModelForCausalLM.register(KVShiftConfig, KVShiftForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
