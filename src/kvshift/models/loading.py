"""Loading saved models: check a model directory (weights, config, tokenizer) and load model + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["WEIGHT_FILES", "check_model_dir", "load_model_and_tokenizer"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _remote_code_tokenizer(folder: Path) -> bool:
    """Whether the folder's tokenizer_config.json names its own tokenizer code (an ``auto_map``)."""
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False


def check_model_dir(path: str | Path, tokenizer: str | Path | None = None, *, trust_remote_code: bool = False):
    """Validate a Hugging Face model directory; return its ``(config, tokenizer)``.

    ``trust_remote_code``: let a tokenizer whose ``tokenizer_config.json`` names its own code (Baichuan-M1's)
    run it, as transformers' flag of that name does; off by default.

    Raises ``FileNotFoundError`` for a missing directory and ``ValueError`` with a clear message for a
    directory that is not a model (no ``config.json`` or no weights), a config that does not load (e.g.
    unknown fields), a missing tokenizer, or a tokenizer with more tokens than the model's ``vocab_size``.
    """
    from transformers import AutoConfig, AutoTokenizer

    import kvshift  # noqa: F401  (registers the kvshift model type)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if (path / "trainer_state.json").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise ValueError(f"{path} is a training checkpoint (weights, optimizer and data state), not a model "
                         f"directory: use {run / 'final'}, which the run writes when it finishes, or continue "
                         f"training with `kvshift train --resume {path}`")
    is_run = path.is_dir() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()) and not any(
        (path / name).is_file() for name in WEIGHT_FILES)
    if is_run and (path / "final" / "config.json").is_file():
        raise ValueError(f"{path} is a training run folder; its model is {path / 'final'}")
    if is_run:
        raise ValueError(f"{path} is a training run folder without a final model yet (it writes {path / 'final'} "
                         f"when it finishes); continue it with `kvshift train --resume {path}`")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a model directory: no config.json (save one with model.save_pretrained(DIR) "
            "or `kvshift convert`)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{path} is not a model directory: no weights ({', '.join(WEIGHT_FILES)})")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} does not load: {err}") from err
    tok_path = Path(tokenizer) if tokenizer is not None else path
    try:
        tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure means "no usable tokenizer here"
        if not trust_remote_code and _remote_code_tokenizer(tok_path):
            raise ValueError(f"the tokenizer at {tok_path} is its own code (an auto_map in tokenizer_config.json, as "
                             "Baichuan-M1's is): pass --trust-remote-code to run it, if you trust that folder") from err
        raise ValueError(
            f"cannot load a tokenizer from {tok_path} ({type(err).__name__}: {err}); save one beside the "
            "model with tokenizer.save_pretrained(DIR)"
        ) from err
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the tokenizer at {tok_path} has {len(tok)} tokens but the "
            f"model's vocab_size is {vocab_size}"
        )
    return config, tok


def load_model_and_tokenizer(path: str | Path, *, device: str | None = None, dtype: str = "auto",
                             trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a validated model directory, the model in eval mode on ``device``;
    ``trust_remote_code`` as in :func:`check_model_dir` (the tokenizer's code only: the model is kvshift's)."""
    import torch
    from transformers import AutoModelForCausalLM

    _, tok = check_model_dir(path, trust_remote_code=trust_remote_code)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok
