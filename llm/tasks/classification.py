"""What the two classification tasks share: label options, the loss, accuracy.

Labels are class indices in [0, num_labels); `labels` optionally names them
(saved with the model, exported as Hugging Face's id2label).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.kernels.reference import upcast
from llm.tasks.base import Task


def classification_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy of logits (B, num_labels) against labels (B,) int64, in fp32."""
    return F.cross_entropy(upcast(logits), labels.view(-1)) if labels is not None else None


class ClassificationTask(Task):
    """Accuracy next to the mean loss; id2label in Hugging Face configs."""

    def check_labels(self, path: str) -> None:
        names = self.options.labels
        if names is not None and len(names) != self.options.num_labels:
            raise ConfigError(f"{path}.labels", f"{len(names)} names for num_labels={self.options.num_labels}")

    def eval_sums(self, batch, output):
        sums = super().eval_sums(batch, output)
        labels = batch["labels"].view(-1)
        sums["correct"] = float((output.logits.argmax(-1).view(-1) == labels.to(output.logits.device)).sum().item())
        sums["examples"] = float(labels.numel())
        return sums

    def eval_metrics(self, sums):
        out = super().eval_metrics(sums)
        out["val_accuracy"] = sums["correct"] / max(sums["examples"], 1.0)
        return out

    def label_names(self) -> list[str]:
        return self.options.labels or [f"LABEL_{i}" for i in range(self.options.num_labels)]

    def hf_options(self, config):
        id2label = config.get("id2label") or {}
        if id2label:
            names = [id2label[k] for k in sorted(id2label, key=int)]
            generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
            return {"num_labels": len(names), "labels": None if generic else names}
        return {"num_labels": config.get("num_labels", 2)}

    def hf_config(self, cfg):
        names = self.label_names()
        return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
