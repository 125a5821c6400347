"""The Hugging Face model: config, causal LM and task heads, decode state, conversion from Llama-family
checkpoints. Importing this package registers the ``kvshift`` model type with the Auto classes."""

from .configuration import KVShiftConfig
from .modeling import (
    KVShiftForCausalLM,
    KVShiftForQuestionAnswering,
    KVShiftForSequenceClassification,
    KVShiftForTokenClassification,
    KVShiftModel,
    KVShiftPreTrainedModel,
)

__all__ = ["KVShiftConfig", "KVShiftForCausalLM", "KVShiftModel", "KVShiftPreTrainedModel",
           "KVShiftForSequenceClassification", "KVShiftForTokenClassification", "KVShiftForQuestionAnswering"]


def _register_auto_classes() -> None:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    pairs = [(AutoModel, KVShiftModel), (AutoModelForCausalLM, KVShiftForCausalLM),
             (AutoModelForSequenceClassification, KVShiftForSequenceClassification),
             (AutoModelForTokenClassification, KVShiftForTokenClassification),
             (AutoModelForQuestionAnswering, KVShiftForQuestionAnswering)]
    try:
        AutoConfig.register("kvshift", KVShiftConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    for auto, cls in pairs:
        try:
            auto.register(KVShiftConfig, cls)
        except ValueError:
            pass


_register_auto_classes()
