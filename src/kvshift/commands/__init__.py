"""One module per `kvshift <command>`, each with ``add_arguments(parser)`` and ``run(args) -> int``: the only
place that parses arguments (library modules carry no argparse)."""

# command -> help; the module is kvshift.commands.<command>
COMMANDS: dict[str, str] = {
    "reproduce": "run a paper experiment (induction, ngram, hopk, theorems)",
    "train": "train a language model from a recipe",
    "compare": "multi-seed vanilla vs KV-shifting comparison",
    "data": "prepare token shards from a corpus",
    "generate": "generate text with a saved model",
    "eval": "evaluate a saved model with lm-evaluation-harness",
    "bench": "benchmarks: ratios against vanilla attention",
    "convert": "convert a Llama / Qwen2 / Qwen3 / Mistral or Baichuan-M1 checkpoint",
    "export": "export a kvshift checkpoint to another runtime (mlx: an mlx-lm model folder)",
}

__all__ = ["COMMANDS"]
