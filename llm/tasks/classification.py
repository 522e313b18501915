"""What the two classification tasks share: label options, the loss, accuracy, macro-F1
and the confusion matrix.

Labels are class indices in [0, num_labels); `labels` optionally names them
(saved with the model, exported as Hugging Face's id2label). A fine-tuning run whose
task gives no `labels` takes them from its training data (`with_data`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.kernels.reference import upcast
from llm.tasks.base import Task


@dataclasses.dataclass
class LabelOptions:
    """The options every classification task takes."""

    num_labels: int = 2
    labels: list[str] | None = None  # class names, index order

    def validate(self, path: str = "task") -> None:
        if self.num_labels < 2:
            raise ConfigError(f"{path}.num_labels", f"must be >= 2, got {self.num_labels}")


# the head's tensors whose rows are the labels (dim 0), in both classifiers
LABEL_ROWS = ("classifier.weight", "classifier.bias")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy of logits (B, num_labels) against labels (B,) int64, in fp32."""
    return F.cross_entropy(upcast(logits), labels.view(-1)) if labels is not None else None


class ClassificationTask(Task):
    """Accuracy next to the mean loss; id2label in Hugging Face configs."""

    def check_labels(self, path: str) -> None:
        names = self.options.labels
        if names is not None and len(names) != self.options.num_labels:
            raise ConfigError(f"{path}.labels", f"{len(names)} names for num_labels={self.options.num_labels}")

    def dataset_labels(self, data, path: str) -> list[str] | None:
        """The label names found in the training data at `path` (None: the data does not say)."""
        return None

    def with_data(self, data, start=None):
        """The task with its label map decided, when the recipe gives no `labels`: the names of the
        model the run starts from (`start`) where its head's rows are named and the training data's
        labels are among them (so each row keeps its name, as transformers' run_glue.py keeps a
        model's label2id), else the training data's (sorted; `dataset_labels`); num_labels follows."""
        if self.options.labels is not None:
            return self
        names = None
        if data.source == "shards" and data.train is not None:
            blend = isinstance(data.train, list)
            fields = [f"data.train[{i}].path" for i in range(len(data.train))] if blend else ["data.train"]
            found = [(f, p, self.dataset_labels(data, p)) for f, p in zip(fields, data.train_paths)]
            names = found[0][2]
            for field, path, other in found[1:]:  # a blend's parts must agree on the label set
                if other != names:
                    raise ConfigError(field, f"{path}: labels {other} differ from {found[0][1]}'s {names}")
            if names is not None and len(names) < 2:
                raise ConfigError(fields[0], f"{found[0][1]}: a classifier needs at least 2 labels, found {names}")
        named = start.options.labels if isinstance(start, ClassificationTask) else None
        if named is not None and (names is None or set(names) <= set(named)):
            names = named
        if names is None:
            return self
        options = dataclasses.replace(self.options, num_labels=len(names), labels=list(names))
        return type(self)(dataclasses.asdict(options))

    def head_from(self, start, state: dict, fresh: dict) -> tuple[dict, str]:
        """`state`, the weights of a model of task `start` that a run begins from, with the head's rows
        (LABEL_ROWS) in this task's label order: each label's row from `start` where it names the
        label, else from `fresh` (the new model's own initialisation). Returns (state, what changed in
        words, "" when nothing did: either side's rows are unnamed, or named alike)."""
        theirs, ours = getattr(start.options, "labels", None), self.options.labels
        if not isinstance(start, ClassificationTask) or theirs is None or ours is None or theirs == ours:
            return state, ""
        index = {name: i for i, name in enumerate(theirs)}
        state = dict(state)
        for key in LABEL_ROWS:
            if key in state and key in fresh:
                rows = [state[key][index[n]] if n in index else fresh[key][i] for i, n in enumerate(ours)]
                state[key] = torch.stack(rows)
        new = [n for n in ours if n not in index]
        note = f"classifier rows by label name ({', '.join(theirs)} -> {', '.join(ours)})"
        return state, note + (f", fresh rows for {', '.join(new)}" if new else "")

    def eval_sums(self, batch, output):
        sums = super().eval_sums(batch, output)
        labels = batch["labels"].view(-1).cpu()
        predicted = output.logits.argmax(-1).view(-1).cpu()
        sums["correct"] = float((predicted == labels).sum().item())
        sums["examples"] = float(labels.numel())
        k = self.options.num_labels
        counts = torch.bincount(labels * k + predicted, minlength=k * k)
        for index in counts.nonzero().view(-1).tolist():
            sums[f"confusion.{index // k}.{index % k}"] = float(counts[index])
        return sums

    def eval_metrics(self, sums):
        out = super().eval_metrics(sums)
        out["val_accuracy"] = sums["correct"] / max(sums["examples"], 1.0)
        out["val_macro_f1"] = macro_f1(self.confusion(sums))
        return out

    def confusion(self, sums: dict[str, float]) -> np.ndarray:
        """The (num_labels, num_labels) int64 confusion matrix of summed eval_sums: rows true, columns predicted."""
        k = self.options.num_labels
        matrix = np.zeros((k, k), dtype=np.int64)
        for key, value in sums.items():
            if key.startswith("confusion."):
                _, true, pred = key.split(".")
                matrix[int(true), int(pred)] = int(value)
        return matrix

    def label_names(self) -> list[str]:
        return self.options.labels or [f"LABEL_{i}" for i in range(self.options.num_labels)]

    def data_names(self) -> list[str]:
        """What a data label must read to be each row's class: the labels' names, or for a model whose
        rows are unnamed (Hugging Face's LABEL_0, LABEL_1, ...) the row index, as integer labels give it."""
        return self.options.labels or [str(i) for i in range(self.options.num_labels)]

    def rows_of(self, classes: list[str], path) -> list[int]:
        """The model's row for each of the data's class names `classes` (by name, never by position).
        Raises UserError naming `path` and the first class the model lacks."""
        from llm.errors import UserError

        index = {name: i for i, name in enumerate(self.data_names())}
        for name in classes:
            if name not in index:
                raise UserError(f"{path}: class {name!r} is not one of the model's labels ({', '.join(index)})")
        return [index[name] for name in classes]

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


def macro_f1(confusion: np.ndarray) -> float:
    """The unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that occur
    as a true or a predicted label (scikit-learn's f1_score(average="macro"); F1 of a class with
    no true and no predicted example is left out, one with TP = 0 counts as 0)."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    if not present.any():
        return 0.0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1[present].mean())
