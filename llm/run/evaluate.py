"""`llm eval`: the metrics of a model (any path the loader reads) on a shard directory or a file.

Language models report the mean loss and perplexity. Classifiers report the loss, accuracy
and macro-F1 and write their confusion matrix (rows: true label, columns: predicted) as a
table, confusion.json and confusion.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llm.data.config import DataConfig
from llm.errors import UserError
from llm.fileio import write_atomic
from llm.models.base import Model
from llm.run.loader import find_tokenizer, load_model
from llm.tasks import task_of
from llm.tasks.classification import ClassificationTask


def evaluate_model(
    *,
    model: str,
    data: str,
    out: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] | None = None,
) -> dict:
    """Loss and perplexity of a language model; accuracy, macro-F1 and confusion matrix of a classifier.

    One pass, in order, over the windows (or examples) of a shard directory or an example file.
    Prints the metrics and the number of batches on one line; a classifier also prints its confusion
    matrix (rows: true label, columns: predicted) and writes confusion.json and confusion.png.
    Returns the metrics, for a classifier also "confusion" (a list of rows), "labels" and the paths.

    Args:
        model: a run's checkpoints/ dir, a step dir, or a model directory
        data: a shard directory (manifest.json), or a JSONL/CSV/Parquet/.npz file
        out: folder for confusion.json/.png (default: DATA.eval beside the data)
        text_field: text column of an example file
        label_field: label column of an example file
        seq_len: window length (default: the model's max_seq_len)
        batch_size: windows or examples per batch
        max_batches: stop after this many batches (default: all)
        dtype: cast the model's weights (rotary tables stay float32; default: as loaded)

    Example:
        llm eval --model runs/quickstart/checkpoints --data data/quickstart/val
        llm eval --model runs/sentiment/export --data data/sentiment/val.jsonl --out runs/sentiment/eval
    """
    lm = load_model(model, dtype=dtype).eval()
    tokenizer = find_tokenizer(model)
    config = DataConfig(
        source="shards",
        train=str(data),
        val=str(data),
        seq_len=seq_len or lm.config.max_seq_len,
        tokenizer=tokenizer and str(tokenizer),
        text_field=text_field,
        label_field=label_field,
    )
    folder = Path(out) if out is not None else Path(str(data).rstrip("/") + ".eval")
    result = evaluate(lm, config, batch_size=batch_size, max_batches=max_batches, out=folder, name=model)
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items()))
    if "confusion" in result:
        print(confusion_table(np.array(result["confusion"]), result["labels"]))
        print(f"confusion matrix: {result['confusion_json']}, {result['confusion_png']}")
    return result


@torch.no_grad()
def evaluate(
    model: Model, config: DataConfig, *, batch_size: int, max_batches: int | None, out: Path, name: str
) -> dict:
    """The metrics of a loaded `model` in eval mode over `config.val`, as `evaluate_model` returns them;
    a classifier's confusion matrix is written under `out`; `name` names the model in errors."""
    task = task_of(model)
    try:
        batches = task.batches(model.config, config, "val", seed=0, micro_batch_size=batch_size, rank=0, world_size=1)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    sums: dict[str, float] = {}
    count = 0
    while max_batches is None or count < max_batches:
        batch = batches.next_batch()
        if batch is None:
            break
        for key, value in task.eval_sums(batch, model(**batch)).items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
    if not count:
        raise UserError(f"{config.val}: no batches to evaluate")
    metrics = {k.removeprefix("val_"): v for k, v in task.eval_metrics(sums).items()}
    result = {**metrics, "batches": count}
    if isinstance(task, ClassificationTask):
        matrix, names = task.confusion(sums), task.label_names()
        result.update(labels=names, confusion=matrix.tolist(), **write_confusion(matrix, names, metrics, out))
    return result


def confusion_table(matrix, names: list[str]) -> str:
    """The confusion matrix as a text table: one row per true label, one column per prediction."""
    width = max([len("true \\ predicted")] + [len(n) for n in names])
    cells = [max(len(n), len(str(int(matrix.max(initial=0))))) for n in names]
    lines = [" ".join(["true \\ predicted".ljust(width)] + [n.rjust(c) for n, c in zip(names, cells)])]
    for name, row in zip(names, matrix):
        lines.append(" ".join([name.ljust(width)] + [str(int(v)).rjust(c) for v, c in zip(row, cells)]))
    return "\n".join(lines)


def write_confusion(matrix, names: list[str], metrics: dict, folder: Path) -> dict:
    """confusion.json (labels, matrix, metrics) and confusion.png under `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    record = {"labels": names, "confusion": matrix.tolist(), "rows": "true", "columns": "predicted", **metrics}
    write_atomic(folder / "confusion.json", json.dumps(record, indent=2) + "\n")
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max(initial=0)
    for i in range(k):
        for j in range(k):
            color = "white" if matrix[i, j] > top / 2 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color, fontsize=8)
    ax.set_title(f"accuracy {metrics.get('accuracy', 0):.3f}, macro-F1 {metrics.get('macro_f1', 0):.3f}")
    fig.tight_layout()
    png = folder / "confusion.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"confusion_json": str(folder / "confusion.json"), "confusion_png": str(png)}
