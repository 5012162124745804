"""Data pipeline: tokenizers, text corpora, prepared Arrow token datasets, samplers."""

from moedist.data.corpus import Document, read_documents, split_documents, stdlib_documents
from moedist.data.dataset import (
    BatchSampler,
    DatasetInfo,
    TokenDataset,
    prepare_dataset,
    val_batches,
)
from moedist.data.errors import DataError
from moedist.data.tokenizer import (
    AnyTokenizer,
    BPETokenizer,
    ByteTokenizer,
    token_dtype,
    tokenizer_from_spec,
)

__all__ = [
    "AnyTokenizer",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "DataError",
    "DatasetInfo",
    "Document",
    "TokenDataset",
    "prepare_dataset",
    "read_documents",
    "split_documents",
    "stdlib_documents",
    "token_dtype",
    "tokenizer_from_spec",
    "val_batches",
]
