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
    # transformers also keeps name tables of in-tree models (what is a base model, what takes labels); its
    # own tests and tools read them. The lazy Auto mappings only see names that CONFIG_MAPPING_NAMES lists,
    # so these entries change nothing there; they let name-based checks treat kvshift like Llama.
    from transformers.models.auto import modeling_auto as names

    for table, cls in [(names.MODEL_MAPPING_NAMES, KVShiftModel),
                       (names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, KVShiftForCausalLM),
                       (names.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, KVShiftForSequenceClassification),
                       (names.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, KVShiftForTokenClassification),
                       (names.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, KVShiftForQuestionAnswering)]:
        table.setdefault(KVShiftConfig.model_type, cls.__name__)


_register_auto_classes()
