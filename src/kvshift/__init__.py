"""kvshift: KV shifting attention (Xu et al., ICML 2025) as a PyTorch op and a Hugging Face model.

Importing kvshift registers the ``kvshift`` model type with the Hugging Face Auto classes.
"""

from .models import (  # importing the models package registers the Auto classes
    KVShiftConfig,
    KVShiftForCausalLM,
    KVShiftForQuestionAnswering,
    KVShiftForSequenceClassification,
    KVShiftForTokenClassification,
    KVShiftModel,
    KVShiftPreTrainedModel,
)
from .ops import kv_shift, kv_shift_ref
from .train.optim import optimizer_param_groups

__version__ = "0.1.0"
__all__ = ["kv_shift", "kv_shift_ref", "KVShiftConfig", "KVShiftForCausalLM", "KVShiftModel",
           "KVShiftPreTrainedModel", "KVShiftForSequenceClassification", "KVShiftForTokenClassification",
           "KVShiftForQuestionAnswering", "optimizer_param_groups", "__version__"]
