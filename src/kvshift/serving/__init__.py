"""Serving kvshift checkpoints with vLLM.

``kvshift.serving.vllm`` is the plugin vLLM loads through the ``vllm.general_plugins`` entry point: it
registers the out-of-tree model :class:`kvshift.serving.vllm_model.KVShiftForCausalLM` (imported by vLLM
only when a ``KVShiftForCausalLM`` checkpoint is served). Nothing here imports vLLM at package import.
"""
