"""GGUF files as conversion sources: check what transformers can dequantise, then load through its loader."""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_gguf", "check_gguf", "load_gguf_model", "load_gguf_tokenizer", "GGUF_INSTALL_HINT"]

GGUF_INSTALL_HINT = "pip install 'kvshift[gguf]' (the gguf and accelerate packages)"
# tensor types transformers' GGUF loader takes as they are (everything else goes through gguf's dequantize)
_PLAIN_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


def is_gguf(source) -> bool:
    """Whether ``source`` names a GGUF file (by its suffix; it need not exist)."""
    return isinstance(source, (str, Path)) and str(source).lower().endswith(".gguf")


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading a GGUF file needs the gguf package: {GGUF_INSTALL_HINT}") from None
    return gguf


def check_gguf(path: str | Path) -> str:
    """The file's GGUF architecture, after checking that transformers can load and dequantise it.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (one line) for a missing ``gguf``
    package, a file that is not GGUF, an architecture transformers' GGUF loader does not know, or a tensor
    type that neither transformers nor gguf can dequantise.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--from {path}: no such file")
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a GGUF file we can read"
        raise ValueError(f"--from {path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"--from {path}: the GGUF file names no architecture (general.architecture)")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f"--from {path}: GGUF architecture {arch!r} cannot be loaded by transformers' GGUF "
                         f"loader (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    from gguf.quants import _type_traits

    known = _PLAIN_TYPES | {t.name for t in _type_traits}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in known]
    if bad:
        raise ValueError(f"--from {path}: tensor type {bad[0]} cannot be dequantised (this gguf "
                         f"{getattr(gguf, '__version__', '')} reads {', '.join(sorted(known))})")
    return arch


def _split(path: str | Path) -> tuple[str, str]:
    path = Path(path).expanduser().resolve()
    return str(path.parent), path.name


def load_gguf_config(path: str | Path):
    from transformers import AutoConfig

    folder, name = _split(path)
    return AutoConfig.from_pretrained(folder, gguf_file=name)


def load_gguf_model(path: str | Path, dtype):
    """The ``*ForCausalLM`` that transformers dequantises from the GGUF file (fp32 unless ``dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = _split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in the GGUF file (with its chat template, when the file has one)."""
    from transformers import AutoTokenizer

    folder, name = _split(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)
