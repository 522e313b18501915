"""`DataConfig`: a recipe's `data:` section, where batches come from (and `PrepareConfig`, how the
quickstart makes its shards on the first run)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from llm.config import ConfigError, check, join, positive


@dataclasses.dataclass
class PrepareConfig:
    """How to build the shards when `data.train` is missing (the quickstart's first run)."""

    corpus: Literal["stdlib"] = "stdlib"  # the Python standard library's sources
    limit_bytes: int = 4_000_000
    tokenizer_kind: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: int = 8192
    shard_tokens: int = 1_000_000
    val_fraction: float = 0.02

    def validate(self, path: str = "data.prepare") -> None:
        positive(self, path, "limit_bytes", "vocab_size", "shard_tokens")
        check(0.0 < self.val_fraction < 1.0, join(path, "val_fraction"), f"must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass
class BlendEntry:
    """One shard directory of a blended training split and its relative weight."""

    path: str
    weight: float = 1.0

    def validate(self, path: str) -> None:
        check(self.weight >= 0, join(path, "weight"), f"must be >= 0, got {self.weight}")


@dataclasses.dataclass
class DataConfig:
    """Where batches come from. `source: shards` reads Arrow shard dirs (llm data prepare);
    `source: synthetic` draws reproducible random batches (benchmarks, tests).

    `train` is one shard directory or example file, or a blend: a list of `{path, weight}` read as
    one deterministic weighted mixture (`llm.data.Blend`)."""

    source: Literal["shards", "synthetic"] = "shards"
    # shard dir of the training split, a JSONL/CSV/Parquet file (fine-tuning), or a blend of shard dirs
    train: str | list[BlendEntry] | None = None
    val: str | None = None  # shard dir or file of the validation split (None: no validation)
    tokenizer: str | None = None  # tokenizer.json (generation, preparation)
    text_field: str = "text"  # columns of example files (text_classification, instruction)
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    seq_len: int = 256
    # packed causal-LM windows keep their documents apart: attention, positions and targets stop at each EOS
    # (llm.data.PackedDocuments)
    document_mask: bool = False
    num_workers: int = 0
    prepare: PrepareConfig | None = None

    def validate(self, path: str = "data") -> None:
        positive(self, path, "seq_len")
        check(self.num_workers >= 0, join(path, "num_workers"), f"must be >= 0, got {self.num_workers}")
        if self.source == "shards":
            check(self.train is not None, join(path, "train"), "source 'shards' needs a train shard directory")
        elif self.document_mask:
            raise ConfigError(join(path, "document_mask"), "needs shards (synthetic samples hold no documents)")
        if isinstance(self.train, list):
            check(bool(self.train), join(path, "train"), "a blend needs at least one {path, weight}")
            check(sum(e.weight for e in self.train) > 0, join(path, "train"), "a blend needs a positive total weight")
            check(self.prepare is None, join(path, "prepare"), "cannot prepare a blend; prepare each part first")

    @property
    def train_paths(self) -> list[str]:
        """The training shard directories (one, or each part of a blend)."""
        if self.train is None:
            return []
        return [self.train] if isinstance(self.train, str) else [e.path for e in self.train]
