"""`kvshift generate`: generate text from a saved model directory (greedy, sampling or beam search)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["WEIGHT_FILES", "check_model_dir", "load_model_and_tokenizer", "add_arguments", "run"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path, tokenizer: str | Path | None = None):
    """Validate a Hugging Face model directory; return its ``(config, tokenizer)``.

    Raises ``FileNotFoundError`` for a missing directory and ``ValueError`` with a clear message for a
    directory that is not a model (no ``config.json`` or no weights), a config that does not load (e.g.
    unknown fields), a missing tokenizer, or a tokenizer with more tokens than the model's ``vocab_size``.
    """
    from transformers import AutoConfig, AutoTokenizer

    import kvshift  # noqa: F401  (registers the kvshift model type)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
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
        tok = AutoTokenizer.from_pretrained(tok_path)
    except Exception as err:  # noqa: BLE001 - any failure means "no usable tokenizer here"
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


def load_model_and_tokenizer(path: str | Path, *, device: str | None = None, dtype: str = "auto"):
    """``(model, tokenizer)`` from a validated model directory, the model in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    _, tok = check_model_dir(path)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (with its tokenizer)")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat for a (left-padded) batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy or beam search)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt ({prompt, completion}) instead of plain text")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.num_beams <= 0:
        raise ValueError(f"--num-beams must be positive, got {args.num_beams}")
    model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        pad_id = 0
    if tok.pad_token_id is None and len(args.prompt) > 1:
        tok.pad_token_id = pad_id
    enc = tok(args.prompt, return_tensors="pt", padding=len(args.prompt) > 1).to(model.device)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                      pad_token_id=pad_id)
    for name in ("temperature", "top_k", "top_p"):
        value = getattr(args, name)
        if value is not None:
            gen_kwargs[name] = value
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**enc, **gen_kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    for prompt, ids in zip(args.prompt, new, strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "completion": text}) if args.json else prompt + text)
    return 0
