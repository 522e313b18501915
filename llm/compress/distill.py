"""Knowledge distillation: a student learns from a teacher's temperature-softened outputs.

Loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * L_hard
        + hidden_mse * MSE(P h_s, h_t)

z_s, z_t are the student's and teacher's logits, the KL is summed over classes (the vocabulary) and
averaged over positions with a label (labels != IGNORE_INDEX); T^2 keeps the soft term's gradients on
the scale of the hard term's as T changes. L_hard is the student's own task loss (its output.loss).
The optional hidden-state term matches the students's final hidden states, mapped to the teacher's
width by a learned projection P (no bias), to the teacher's (FitNets, Romero et al. 2015), over the
same positions where labels are per token, else over the real tokens (the attention mask: a
classifier's padding never counts).

`Distiller` wraps the student for the engine: the student and P are its submodules (trained,
sharded, checkpointed); the teacher is deliberately not one. It is a plain frozen module in eval mode,
held whole on every rank and run under no_grad, so DeepSpeed never sees it: ZeRO (stage 3 included)
partitions only the student, and the teacher costs its full size in memory on each rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import check, join, positive
from llm.kernels.reference import IGNORE_INDEX
from llm.models.transformer import ModelOutput


@dataclasses.dataclass
class DistillConfig:
    """A recipe's `distill:` section (`llm distill`): a teacher's softened logits (and optionally hidden
    states) guide the recipe's model through `Distiller`."""

    teacher: str | None = None  # any path the loader reads; must share the student's tokenizer
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T^2 (Hinton et al. 2015)
    alpha: float = 0.5  # weight of the KL term; (1 - alpha) weighs the hard-label loss
    hidden_mse: float = 0.0  # weight of MSE(projection(student hidden), teacher hidden); 0 = off

    def validate(self, path: str = "distill") -> None:
        positive(self, path, "temperature")
        check(0 <= self.alpha <= 1, join(path, "alpha"), f"must be in [0, 1], got {self.alpha}")
        check(self.hidden_mse >= 0, join(path, "hidden_mse"), f"must be >= 0, got {self.hidden_mse}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    hard_loss: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, the KL term before weighting): logits (..., C) of the same shape, labels (...)
    int64 marking positions that count (IGNORE_INDEX = skip; None = every position), hard_loss the
    student's mean task loss (needed when alpha < 1). Computed in float32 at least."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    if labels is not None:
        mask = (labels != IGNORE_INDEX).to(dtype)
        kl = (per_position * mask).sum() / mask.sum().clamp(min=1)
    else:
        kl = per_position.mean()
    total = alpha * temperature**2 * kl
    if alpha < 1:
        if hard_loss is None:
            raise ValueError("alpha < 1 needs the student's hard-label loss")
        total = total + (1 - alpha) * hard_loss.to(dtype)
    return total, kl


class Distiller(nn.Module):
    """The student plus the teacher's guidance; see the module docstring. In eval mode (or without
    labels) it is the student alone. `config`, `task`, `transforms` and `description()` are the
    student's; the description also records the teacher and where the student's weights sit."""

    PREFIX = "student."

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        teacher_path: str,
        temperature: float,
        alpha: float,
        hidden_mse: float = 0.0,
    ):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule
        self.teacher_path, self.temperature, self.alpha, self.hidden_mse = teacher_path, temperature, alpha, hidden_mse
        d_s, d_t = student.config.d_model, teacher.config.d_model
        self.proj = nn.Linear(d_s, d_t, bias=False) if hidden_mse else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=d_s**-0.5)

    @property
    def config(self):
        return self.student.config

    @property
    def task(self) -> str:
        return self.student.task

    @property
    def transforms(self) -> list[dict]:
        return self.student.transforms

    def description(self) -> dict:
        return {**self.student.description(), "distill": {"teacher": self.teacher_path, "student_prefix": self.PREFIX}}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return self.student.num_parameters(trainable_only)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (dropout off)
        return self

    def forward(self, **batch) -> ModelOutput:
        out = self.student(**batch)
        labels = batch.get("labels")
        if not self.training or labels is None:
            return out
        with torch.no_grad():
            teacher = self.teacher(**{k: v for k, v in batch.items() if k != "labels"})
        loss, _ = distillation_loss(out.logits, teacher.logits, labels, out.loss, self.temperature, self.alpha)
        if self.proj is not None:
            h_s, h_t = out.hidden_states, teacher.hidden_states.to(out.hidden_states.dtype)
            counted = batch.get("attention_mask")  # a classifier's padded texts: the real tokens
            if h_s.dim() == 3 and labels.shape == h_s.shape[:2]:
                counted = labels != IGNORE_INDEX
            if h_s.dim() == 3 and counted is not None:
                mask = counted.to(h_s.dtype)[..., None]
                err = ((self.proj(h_s) - h_t) ** 2 * mask).sum() / (mask.sum() * h_t.shape[-1]).clamp(min=1)
            else:
                err = F.mse_loss(self.proj(h_s), h_t)
            loss = loss + self.hidden_mse * err
        return ModelOutput(logits=out.logits, loss=loss, hidden_states=out.hidden_states)
