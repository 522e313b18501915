"""Data: tokenizers, Arrow shards with a manifest, the streaming reader, collators, synthetic samples."""

from llm.data.collate import (
    ContrastiveImageCollator,
    ContrastiveTextCollator,
    MaskedImageCollator,
    MLMCollator,
    PackedDocuments,
    PadCollator,
    collate_causal_lm,
    collate_images,
)
from llm.data.examples import Examples, label_ids, label_names, read_table, table_kind
from llm.data.images import ImageStream, prepare_images, read_images
from llm.data.prepare import prepare
from llm.data.shards import ShardError, check_vocab, inspect, load_manifest, verify
from llm.data.sources import stdlib_files
from llm.data.stream import (
    Batches,
    Blend,
    Documents,
    PackedTokens,
    SentencePairs,
    SpanPairs,
    StatefulLoader,
    Stream,
)
from llm.data.synthetic import SyntheticBatches, SyntheticCorpus
from llm.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "Batches",
    "Blend",
    "SyntheticBatches",
    "SyntheticCorpus",
    "ContrastiveImageCollator",
    "ContrastiveTextCollator",
    "Documents",
    "Examples",
    "PadCollator",
    "label_ids",
    "label_names",
    "read_table",
    "table_kind",
    "ImageStream",
    "MLMCollator",
    "MaskedImageCollator",
    "SentencePairs",
    "SpanPairs",
    "collate_images",
    "prepare_images",
    "read_images",
    "PackedDocuments",
    "PackedTokens",
    "ShardError",
    "StatefulLoader",
    "Stream",
    "Tokenizer",
    "check_vocab",
    "collate_causal_lm",
    "inspect",
    "load_manifest",
    "prepare",
    "stdlib_files",
    "train_tokenizer",
    "verify",
]
