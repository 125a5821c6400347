"""Data pipeline: text sources, tokenizer training, token shards and packed batches for training."""

from .packing import (
    IGNORE_INDEX,
    PackedBatches,
    TokenDataset,
    documents_covered,
    documents_in_row,
    position_ids_to_cu_seqlens,
    val_batches,
    validation_batches,
    validation_rows,
)
from .shards import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, FORMAT_VERSION, prepare, read_meta, token_dtype
from .sources import Document, TextSource, iter_documents, resolve_source
from .tokenizer import EOS_TOKEN, TextTokenizer, load_tokenizer, train_bpe

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "Document",
    "PackedBatches",
    "TextSource",
    "TextTokenizer",
    "TokenDataset",
    "documents_covered",
    "documents_in_row",
    "iter_documents",
    "load_tokenizer",
    "position_ids_to_cu_seqlens",
    "prepare",
    "read_meta",
    "resolve_source",
    "token_dtype",
    "train_bpe",
    "val_batches",
    "validation_batches",
    "validation_rows",
]
