"""Tokenizers for data preparation: train a deterministic byte-level BPE or load an existing tokenizer."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Tried in order when a loaded tokenizer does not declare an EOS token itself.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
MIN_BPE_VOCAB = 257  # 256 byte symbols + the EOS token


def _tokenizer_config(eos_token: str) -> bytes:
    """tokenizer_config.json that makes ``AutoTokenizer.from_pretrained(dir)`` load tokenizer.json."""
    config = {  # no BOS: documents are separated by EOS, which also pads (as GPT-2 does)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": eos_token,
        "clean_up_tokenization_spaces": False,
    }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _max_id_vocab_size(vocab: dict[str, int], reported: int) -> int:
    """Size of the id space: one past the largest id (ids need not be contiguous)."""
    return max(reported, max(vocab.values(), default=-1) + 1)


class TextTokenizer:
    """What data preparation needs from a tokenizer: batch encoding without special tokens, decoding, the
    EOS id, the id-space size and the files to store next to the shards.

    Wraps a ``tokenizers.Tokenizer`` (used whenever available, with ``encode_special_tokens`` on so a
    literal ``<|endoftext|>`` inside a document is encoded as ordinary text and never becomes a separator)
    or, as a fallback, a slow transformers tokenizer.
    """

    def __init__(
        self,
        *,
        name: str,
        eos_token: str,
        files: dict[str, bytes],
        backend: Tokenizer | None = None,
        hf_tokenizer: Any = None,
    ) -> None:
        if backend is None and hf_tokenizer is None:
            raise ValueError("TextTokenizer needs a tokenizers backend or a transformers tokenizer")
        self.name = name
        self.eos_token = eos_token
        self.files = files
        self.backend = backend
        self.hf_tokenizer = hf_tokenizer
        if backend is not None:
            backend.encode_special_tokens = True
            eos_id = backend.token_to_id(eos_token)
            self.vocab_size = _max_id_vocab_size(
                backend.get_vocab(with_added_tokens=True), backend.get_vocab_size(with_added_tokens=True)
            )
        else:
            eos_id = hf_tokenizer.convert_tokens_to_ids(eos_token)
            if eos_id == getattr(hf_tokenizer, "unk_token_id", None) and eos_token != hf_tokenizer.unk_token:
                eos_id = None
            self.vocab_size = _max_id_vocab_size(hf_tokenizer.get_vocab(), len(hf_tokenizer))
        if eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no token {eos_token!r} to use as EOS")
        self.eos_id = int(eos_id)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS or other special tokens added."""
        if self.backend is not None:
            return [enc.ids for enc in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        return [
            self.hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            for text in texts
        ]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of token ids (special tokens kept)."""
        ids = [int(i) for i in ids]
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 8192,
    *,
    length: int | None = None,
    show_progress: bool = False,
) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, ByteLevel decoder) with ``<|endoftext|>`` as id 0.

    Training is deterministic for a fixed order of ``texts`` (checked across processes and thread counts with
    tokenizers 0.23). The vocabulary can come out smaller than ``vocab_size`` on a tiny corpus.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN}), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _tokenizer_config(EOS_TOKEN),
    }
    return TextTokenizer(name="bytelevel-bpe", eos_token=EOS_TOKEN, files=files, backend=tokenizer)


def _pick_eos(vocab: dict[str, int], declared: str | None, requested: str | None, name: str) -> str:
    if requested is not None:
        if requested not in vocab:
            raise ValueError(f"--eos-token {requested!r} is not in the vocabulary of tokenizer {name!r}")
        return requested
    if declared is not None and declared in vocab:
        return declared
    for candidate in EOS_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise ValueError(
        f"tokenizer {name!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); "
        "name one with --eos-token"
    )


def _from_tokenizer_json(path: Path, name: str, eos_token: str | None) -> TextTokenizer:
    data = path.read_bytes()
    try:
        backend = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:
        raise ValueError(f"could not read tokenizer file {path}: {exc}") from exc
    eos = _pick_eos(backend.get_vocab(with_added_tokens=True), None, eos_token, name)
    files = {"tokenizer.json": data, "tokenizer_config.json": _tokenizer_config(eos)}
    return TextTokenizer(name=name, eos_token=eos, files=files, backend=backend)


def _from_transformers(spec: str, name: str, eos_token: str | None) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        if spec.lower().endswith(".gguf"):  # the tokenizer stored in a GGUF model file
            from ..models.gguf import check_gguf, load_gguf_tokenizer

            check_gguf(spec)
            hf = load_gguf_tokenizer(spec)
        else:
            hf = AutoTokenizer.from_pretrained(spec)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ValueError(f"could not load tokenizer {spec!r} with transformers.AutoTokenizer: {exc}") from exc
    eos = _pick_eos(hf.get_vocab(), hf.eos_token, eos_token, name)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        files = {entry.name: entry.read_bytes() for entry in sorted(Path(tmp).iterdir()) if entry.is_file()}
    backend = getattr(hf, "backend_tokenizer", None)
    return TextTokenizer(name=name, eos_token=eos, files=files, backend=backend, hf_tokenizer=hf)


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> TextTokenizer:
    """Load ``spec``: a ``tokenizer.json`` file, a directory loadable by ``AutoTokenizer`` (or holding a
    ``tokenizer.json``), a GGUF model file (its stored tokenizer), or a Hugging Face hub name. ``eos_token`` overrides the document separator token.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_transformers(str(path), spec, eos_token)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"tokenizer file {spec!r} is not a tokenizer.json file")
        return _from_tokenizer_json(path, spec, eos_token)
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file() or (path / "config.json").is_file():
            return _from_transformers(str(path), spec, eos_token)
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", spec, eos_token)
        raise ValueError(f"tokenizer directory {spec!r} has no tokenizer.json or tokenizer_config.json")
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".json"):
        raise FileNotFoundError(f"tokenizer path does not exist: {spec!r}")
    return _from_transformers(spec, spec, eos_token)


def byte_level_token_lengths(tokenizer_file: str | os.PathLike, vocab_size: int):
    """``[vocab_size]`` int64 array of the bytes each id decodes to, for a byte-level BPE ``tokenizer.json``
    (each symbol of the byte-level alphabet is one byte; added/special tokens count 0); None otherwise."""
    import numpy as np

    path = Path(tokenizer_file)
    if not path.exists():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    decoder = spec.get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    vocab = (spec.get("model") or {}).get("vocab")
    if "ByteLevel" not in kinds or not isinstance(vocab, dict):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    out = np.zeros(vocab_size, dtype=np.int64)
    special = {t["content"] for t in spec.get("added_tokens", [])}
    for token, idx in vocab.items():
        if idx < vocab_size and token not in special:
            if not set(token) <= alphabet:
                return None
            out[idx] = len(token)
    return out


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are
    moved to code points from 256 up, in byte order (the mapping byte-level BPE tokenizers use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` for the raw-byte corpus (:class:`kvshift.data.bytes.ByteCorpus`): id
    ``b`` is the UTF-8 byte ``b``, id 256 is ``<|endoftext|>`` (EOS and padding), no BOS; encoding and
    decoding are exact inverses on any text."""
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == 256
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False)


def model_tokenizer(data_dir: str | os.PathLike | None):
    """The tokenizer to save beside a model trained on ``data_dir`` (a prepared folder; None: the raw-byte
    corpus), loadable with ``AutoTokenizer``; one without a pad token pads with its EOS token."""
    if data_dir is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
