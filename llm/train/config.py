"""The loop's own sections of a recipe, `train:` and `checkpoint:`, and `Recipe`: what the train
layer reads of a whole recipe.

The recipe itself (`llm.run.recipe.RecipeConfig`) is composed above this layer, where the task,
transform and compression settings are known; `Recipe` names the part of it the loop uses, so
nothing here imports the assembly.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

from llm.config import check, join, positive
from llm.train.distributed import FaultConfig
from llm.train.schedule import OptimConfig
from llm.train.trackers import LoggingConfig


@dataclasses.dataclass
class TrainConfig:
    """The `train:` section: batch arithmetic, length, precision and the loop's cadence.

    global batch = micro_batch_size x grad_accum x data-parallel ranks; when `global_batch_size`
    is given it must equal that product (checked before start-up, `llm.train.engine.check_batch`)."""

    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None
    max_steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end (when data.val is set)
    eval_batches: int = 8
    non_finite: Literal["skip", "abort"] = "skip"  # what a NaN/Inf loss does
    max_skips: int = 10  # abort after this many consecutive non-finite micro-batches

    def validate(self, path: str = "train") -> None:
        positive(self, path, "micro_batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "max_skips")
        check(self.grad_clip >= 0, join(path, "grad_clip"), f"must be >= 0, got {self.grad_clip}")
        check(self.eval_every >= 0, join(path, "eval_every"), f"must be >= 0, got {self.eval_every}")
        if self.global_batch_size is not None:
            positive(self, path, "global_batch_size")


@dataclasses.dataclass
class CheckpointConfig:
    """The `checkpoint:` section: when the loop saves (llm.train.checkpoint writes) and how many stay."""

    every_steps: int = 0  # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    save_final: bool = True

    def validate(self, path: str = "checkpoint") -> None:
        check(self.every_steps >= 0, join(path, "every_steps"), f"must be >= 0, got {self.every_steps}")
        positive(self, path, "keep_last")


class Recipe(Protocol):
    """The sections of a recipe the trainer reads (a `llm.run.recipe.RecipeConfig` dataclass)."""

    run_dir: str
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    faults: FaultConfig

    def as_recorded(self, saved: dict) -> dict:
        """An earlier run's recipe mapping with this recipe's defaults filled in (for the resume check)."""
