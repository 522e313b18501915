"""What a task is: one objective, with everything that belongs to it.

A task file defines one `Task` subclass and the model class it trains (the
shared trunk plus the task's head and loss). The subclass holds, in one place:

- `Options`: a dataclass of the task's recipe options (`task: {name: ..., ...}`);
- `check(cfg)`: which model configs the task can train, as one clear error;
- `model_class`: the model it builds (`build_model`);
- `shard_stream(...)`: the reader and collator over prepared shards;
- `synthetic_batch(...)`: a reproducible random batch (tests, benchmarks);
- `eval_sums` / `eval_metrics`: validation metrics, summable across ranks;
- `hf_head_rules`, `hf_options`, ...: its head in Hugging Face architectures (which
  architectures answer to the task is each family's: `llm.models.hf`).

A `Task` instance is a task with its options; `llm.tasks.get_task(spec)` makes one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from llm.config import ConfigError, build_config
from llm.data.config import DataConfig
from llm.errors import UserError
from llm.kernels.reference import IGNORE_INDEX
from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.hf import Rule, family_adapter


@dataclasses.dataclass
class NoOptions:
    """A task without options."""


class Task:
    """Base of every task. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    model_class: ClassVar[type[Model]]
    Options: ClassVar[type] = NoOptions
    families: ClassVar[tuple[str, ...]] = ("gpt", "llama", "bert", "vit")
    causal: ClassVar[bool | None] = None  # True/False: the trunk must (not) be causal; None: either
    language_model: ClassVar[bool] = False  # validation reports perplexity
    min_micro_batch: ClassVar[int] = 1
    # reads packed documents from shards and can keep them apart (data.document_mask)
    packs_documents: ClassVar[bool] = False
    # a mean over per-token labels whose model takes position_ids: its sequences split over ranks (parallel.sequence)
    sequence_parallel: ClassVar[bool] = False
    # its model trains with every block split over a tensor-parallel group (parallel.tensor; the head stays whole)
    tensor_parallel: ClassVar[bool] = False
    nested: ClassVar[bool] = True  # Hugging Face head models keep the trunk under a prefix ("bert.", ...)

    def __init__(self, options: Any = None, path: str = "task"):
        self.options = build_config(self.Options, options or {}, path)

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.options)}

    def __repr__(self) -> str:
        return f"Task({self.to_dict()})"

    # -- model --------------------------------------------------------------------------

    def check(self, cfg: ModelConfig, path: str = "model") -> None:
        """Raise a ConfigError if this task cannot train a model of `cfg`."""
        if cfg.family not in self.families:
            raise ConfigError(
                f"{path}.family",
                f"task {self.name!r} needs a {' or '.join(self.families)} model, got {cfg.family!r}",
            )
        if self.causal is not None and cfg.causal != self.causal:
            raise ConfigError(f"{path}.causal", f"task {self.name!r} needs causal: {str(self.causal).lower()}")

    def build_model(self, cfg: ModelConfig) -> Model:
        """A freshly initialised model of `cfg` with this task's head."""
        self.check(cfg)
        return self.model_class(cfg, self.options)

    # -- data ---------------------------------------------------------------------------

    def batches(
        self,
        cfg: ModelConfig,
        data: DataConfig,
        split: str,
        seed: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
    ):
        """This rank's micro-batches of `split` ("train" or "val"): an object with next_batch(),
        state_dict() and load_state_dict(); None when the recipe has no such split."""
        from llm.data import Batches, StatefulLoader, SyntheticBatches, SyntheticCorpus

        if data.source == "synthetic":
            sample_seed = seed + (0 if split == "train" else 1_000_003)
            corpus = SyntheticCorpus(cfg.vocab_size, sample_seed, seed, cfg.image_size, cfg.num_channels)
            make = lambda indices: self.synthetic_batch(corpus, indices, cfg, data.seq_len)
            return SyntheticBatches(make, micro_batch_size, rank, world_size)
        path = data.train if split == "train" else data.val
        if path is None:
            return None
        if isinstance(path, list):  # a blend: each part read whole, the mixture split over ranks
            from llm.data import Blend

            parts = [self._stream(cfg, data, f"data.train[{i}].path", e.path, seed, 0, 1) for i, e in enumerate(path)]
            stream = Blend([(s, e.weight) for (s, _), e in zip(parts, path)], seed, rank, world_size)
            collate = parts[0][1]
        else:
            stream, collate = self._stream(cfg, data, f"data.{split}", path, seed, rank, world_size)
        return Batches(StatefulLoader(stream, micro_batch_size, collate, data.num_workers), wrap=split == "train")

    def _stream(self, cfg, data, field: str, path: str, seed: int, rank: int, world_size: int):
        """(stream, collate) of one shard directory (it has manifest.json) or one file."""
        if not Path(path).exists():
            raise UserError(f"{field}: {path}: not found (a shard directory from `llm data prepare`, or a file)")
        if (Path(path) / "manifest.json").is_file():
            return self.shard_stream(cfg, data, Path(path), seed, rank, world_size)
        return self.file_stream(cfg, data, Path(path), seed, rank, world_size)

    def shard_stream(self, cfg: ModelConfig, data: DataConfig, path: Path, seed: int, rank: int, world_size: int):
        """(stream, collate) reading this rank's samples of the shard directory `path`."""
        raise UserError(f"task {self.name!r} has no shard data pipeline; use data.source: synthetic")

    def file_stream(self, cfg: ModelConfig, data: DataConfig, path: Path, seed: int, rank: int, world_size: int):
        """(stream, collate) reading this rank's examples of a file (JSONL, CSV, Parquet, images)."""
        raise UserError(f"{path}: task {self.name!r} reads shard directories (manifest.json), not files")

    def with_data(self, data: DataConfig, start: Task | None = None) -> Task:
        """This task with the options its training data decides (a classifier's label map); `start`:
        the task of the model the run starts from (`init_from`, else a distillation teacher), whose
        options may decide them instead."""
        return self

    def synthetic_batch(self, corpus, indices: list[int], cfg: ModelConfig, seq_len: int) -> dict:
        """The batch of global samples `indices` drawn from a `llm.data.SyntheticCorpus`."""
        raise UserError(f"task {self.name!r} has no synthetic data")

    def tokens(self, batch: dict[str, torch.Tensor], cfg: ModelConfig) -> int:
        """Tokens (patches + [CLS] for images) the model processes for `batch`."""
        if "input_ids" in batch:
            return batch["input_ids"].numel()
        return batch["pixel_values"].shape[0] * cfg.seq_len

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the model's loss for `batch` is the mean of: labels other than -100 for
        per-token labels (B, T), else one per sample. The trainer weights each micro-batch by it, so
        an optimizer step's loss is the mean over all its terms, across micro-batches and ranks."""
        labels = batch.get("labels")
        if labels is not None and labels.dim() >= 2:
            return int((labels != IGNORE_INDEX).sum())
        first = next(iter(batch.values()))
        return int(first.shape[0])

    @staticmethod
    def tokenizer(data: DataConfig, why: str):
        from llm.data import Tokenizer

        if data.tokenizer is None:
            raise ConfigError("data.tokenizer", f"needed: {why}")
        return Tokenizer(data.tokenizer)

    # -- metrics ------------------------------------------------------------------------

    def eval_sums(self, batch: dict[str, torch.Tensor], output) -> dict[str, float]:
        """Sums of one validation batch; summed over batches and ranks, then `eval_metrics`. The
        model's loss is a mean over `loss_tokens(batch)` terms, so it counts as that many (a short
        last batch weighs what its examples do)."""
        terms = self.loss_tokens(batch)  # 0: a batch with no label (its loss is NaN) adds nothing
        loss = float(output.loss.float().item()) * terms if terms else 0.0
        return {"loss": loss, "loss_terms": float(terms), "batches": 1.0}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the summed `eval_sums`: the mean loss over every loss term of every
        batch and rank, as one batch holding them all would give (scikit-learn's log_loss for a
        classifier), and perplexity exp(mean token loss) for LMs."""
        loss = sums["loss"] / max(sums["loss_terms"], 1.0)
        out = {"val_loss": loss}
        if self.language_model:
            out["val_ppl"] = math.exp(min(loss, 50.0))
        return out

    # -- Hugging Face -------------------------------------------------------------------

    def hf_architecture(self, cfg: ModelConfig) -> str | None:
        """The Hugging Face architecture this task's model of `cfg` exports as (None: none)."""
        return family_adapter(cfg.family).architecture(cfg, self.name, dataclasses.asdict(self.options))

    def resolved(self, cfg: ModelConfig) -> dict:
        """`to_dict()` with the defaults that depend on the model of `cfg` filled in: two tasks whose
        resolved forms are equal build models that compute the same."""
        return self.to_dict()

    def hf_head_rules(self, cfg: ModelConfig) -> list[Rule]:
        """The head's tensors and their Hugging Face names (outside the trunk prefix)."""
        return []

    def hf_tied(self, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
        """Our tensor -> the Hugging Face tensors (outside the trunk prefix) that transformers ties to
        it: GPT2LMHeadModel's lm_head.weight is its wte.weight. They hold no weights of their own."""
        return {}

    def hf_ignored(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Hugging Face tensors that duplicate tied ones (read nowhere, never written)."""
        return tuple(name for names in self.hf_tied(cfg).values() for name in names)

    def hf_options(self, config: dict) -> dict:
        """Task options read from a Hugging Face config.json (e.g. the label names)."""
        return {}

    def hf_config(self, cfg: ModelConfig) -> dict:
        """Entries the task adds to an exported config.json."""
        return {}

    def hf_chat_template(self, eos_token: str | None) -> str | None:
        """The Jinja chat template the task puts into an exported tokenizer (None: none); `eos_token`
        is the spelling of the model's EOS (None: no tokenizer, or no EOS)."""
        return None

    @property
    def mask_token(self) -> bool:
        """Whether the trunk carries a learned mask token (masked image modeling)."""
        return False
