"""`kvshift generate`: generate text from a saved model directory (greedy, sampling or beam search)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]

from ..models.loading import load_model_and_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (with its tokenizer)")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat for a (left-padded) batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default: 32)")
    parser.add_argument("--do-sample", action="store_true", help="sample (default: greedy or beam search)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's generation config)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: the generation config)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the generation config)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, no beam search)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: not seeded)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the model weights (default: auto, the checkpoint's)")
    parser.add_argument("--truncate", action="store_true",
                        help="keep the last max_position_embeddings tokens of a longer prompt (default: refuse "
                             "such a prompt with an error)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the tokenizer's chat template (with the "
                             "assistant's generation prompt) and stop at the template's end token (default: off, "
                             "plain text)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the tokenizer's own code when its tokenizer_config.json names some (Baichuan-M1's "
                             "tokenizer); only for folders you trust (default: off)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt ({prompt, completion}) instead of plain text (default: off)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.num_beams <= 0:
        raise ValueError(f"--num-beams must be positive, got {args.num_beams}")
    model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        pad_id = 0
    if tok.pad_token_id is None and len(args.prompt) > 1:
        tok.pad_token_id = pad_id
    texts, special = list(args.prompt), True
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template (generate without --chat)")
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in args.prompt]
        special = False  # the template already holds every special token
    enc = tok(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=special).to(model.device)
    enc = _fit_context(enc, model.config.max_position_embeddings, args.max_new_tokens, args.truncate)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                      pad_token_id=pad_id)
    if args.chat:  # stop at the end of the assistant's turn: the template's end token and the model's EOS
        stops = {tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None}
        gen_kwargs["eos_token_id"] = sorted(stops)
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


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _fit_context(enc, max_positions: int, max_new_tokens: int, truncate: bool):
    """Refuse (or, with ``truncate``, cut from the left) prompts longer than the trained context; note when
    prompt + new tokens run past it."""
    import sys

    length = enc["input_ids"].shape[1]
    if length > max_positions:
        if not truncate:
            raise ValueError(
                f"--prompt is {length} tokens, longer than the model's max_position_embeddings={max_positions} "
                "(the context it was trained for); shorten it, or pass --truncate to keep its last "
                f"{max_positions} tokens"
            )
        print(f"note: --truncate kept the last {max_positions} of {length} prompt tokens", file=sys.stderr)
        enc = {k: v[:, -max_positions:] for k, v in enc.items()}
        length = max_positions
    if length + max_new_tokens > max_positions:
        print(f"note: prompt ({length} tokens) + --max-new-tokens {max_new_tokens} runs past the model's "
              f"max_position_embeddings={max_positions}; tokens beyond it are outside the trained context",
              file=sys.stderr)
    return enc
