"""AdamW and the learning-rate schedule: the `optim:` and `schedule:` sections, parameter groups, the
lambda the engine steps and DeepSpeed's optimizer JSON."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from llm.config import check, join, positive


@dataclasses.dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (never norms, biases, embeddings)."""

    lr: float = 3e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1

    def validate(self, path: str = "optim") -> None:
        positive(self, path, "lr", "eps")
        check(self.weight_decay >= 0, join(path, "weight_decay"), f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2, join(path, "betas"), f"expected two numbers, got {self.betas}")
        for i, b in enumerate(self.betas):
            check(0.0 <= b < 1.0, f"{join(path, 'betas')}[{i}]", f"must be in [0, 1), got {b}")


@dataclasses.dataclass
class ScheduleConfig:
    """Linear warmup to optim.lr, then cosine or linear decay to min_lr_ratio x lr at decay_steps."""

    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None  # None: train.max_steps
    min_lr_ratio: float = 0.1

    def validate(self, path: str = "schedule") -> None:
        check(self.warmup_steps >= 0, join(path, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        check(
            0.0 <= self.min_lr_ratio <= 1.0, join(path, "min_lr_ratio"), f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        if self.decay_steps is not None:
            positive(self, path, "decay_steps")


# Learned vectors of the image stack that are embeddings in all but type.
VECTOR_PARAMS = ("pos_embed", "cls_token", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases, embeddings and 1-d tensors get none."""
    decay, no_decay, seen = [], [], set()
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embedding_params or name.endswith(VECTOR_PARAMS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then decay to min_lr_ratio."""
    warmup = schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule.decay == "constant":
        return 1.0
    end = schedule.decay_steps or max_steps
    progress = min(1.0, max(0.0, (step - warmup) / max(1, end - warmup)))
    floor = schedule.min_lr_ratio
    if schedule.decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def lr_scheduler(schedule: ScheduleConfig, max_steps: int):
    """A callable DeepSpeed turns into the engine's scheduler (stepped once per optimizer step)."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, max_steps))

    return make


def optimizer_json(optim: OptimConfig, offload: bool) -> dict:
    """DeepSpeed's optimizer section: torch's AdamW on the device, DeepSpeed's CPU Adam when offloaded."""
    params = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if not offload:
        params["torch_adam"] = True
    params["adam_w_mode"] = True
    return {"type": "AdamW", "params": params}
