"""The Hugging Face model: config, causal LM, decode state, conversion from Llama-family checkpoints."""

from .configuration import KVShiftConfig
from .modeling import KVShiftForCausalLM, KVShiftModel, KVShiftPreTrainedModel

__all__ = ["KVShiftConfig", "KVShiftForCausalLM", "KVShiftModel", "KVShiftPreTrainedModel"]
