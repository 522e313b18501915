"""`llm eval`: the metrics of a model (any path the loader reads) on a shard directory or a file.

Language models report the mean loss and perplexity. Classifiers report the loss, accuracy
and macro-F1 and write their confusion matrix (rows: true label, columns: predicted) as a
table, confusion.json and confusion.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.data.config import DataConfig
from llm.errors import UserError
from llm.fileio import write_atomic
from llm.run.loader import find_tokenizer, load_model
from llm.tasks import task_of
from llm.tasks.classification import ClassificationTask


@torch.no_grad()
def evaluate_model(
    model_path: str | Path,
    data: str | Path,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches=None,
    out: str | Path | None = None,
    text_field: str = "text",
    label_field: str = "label",
    dtype: str | None = None,
) -> dict:
    """One pass, in order, over the windows (or samples) of a shard directory or an example
    file: the task's metrics (mean loss and perplexity for language models), with the number of
    batches. For a classifier also "confusion" (a list of rows), "labels" and the paths of the
    JSON and PNG written under `out` (default: DATA.eval next to the data). `dtype` (e.g.
    "bfloat16") casts the weights at load; rotary tables stay float32."""
    model = load_model(model_path, dtype=dtype).eval()
    task = task_of(model)
    cfg = model.config
    tokenizer = find_tokenizer(model_path)
    config = DataConfig(
        source="shards",
        train=str(data),
        val=str(data),
        seq_len=seq_len or cfg.max_seq_len,
        tokenizer=tokenizer and str(tokenizer),
        text_field=text_field,
        label_field=label_field,
    )
    try:
        batches = task.batches(cfg, config, "val", seed=0, micro_batch_size=batch_size, rank=0, world_size=1)
    except UserError as e:
        raise UserError(f"{model_path}: {e}") from None
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
        raise UserError(f"{data}: no batches to evaluate")
    metrics = {k.removeprefix("val_"): v for k, v in task.eval_metrics(sums).items()}
    result = {**metrics, "batches": count}
    if isinstance(task, ClassificationTask):
        matrix, names = task.confusion(sums), task.label_names()
        folder = Path(out) if out is not None else Path(str(data).rstrip("/") + ".eval")
        result.update(labels=names, confusion=matrix.tolist(), **write_confusion(matrix, names, metrics, folder))
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
