"""`llm plot RUN_DIR`: a run's curves, from its metrics.jsonl, to a PNG: train and validation loss,
learning rate, gradient norm, tokens/s, MFU and validation perplexity, each on its own labelled axes.

Training records carry `loss`, `lr`, `grad_norm`, `tokens_per_s` (and `mfu`); validation records
carry `val_loss` (and `val_ppl` for language models).
A resumed run appends to the same file, so a step can appear twice: the later record wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm.errors import UserError


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, each checked to be a JSON object with an integer `step`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a run directory of `llm pretrain`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        records.append(record)
    if not records:
        raise UserError(f"{path}: holds no records yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step, the last record of a repeated step winning."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# (title, y label, [(metric, legend label, scale)]): one panel each, so no two units share an axis
PANELS = [
    ("loss", "loss (nats/token)", [("loss", "train", 1.0), ("val_loss", "validation", 1.0)]),
    ("learning rate", "lr", [("lr", "lr", 1.0)]),
    ("gradient norm", "global L2 norm", [("grad_norm", "grad norm", 1.0)]),
    ("throughput", "tokens/s (all ranks)", [("tokens_per_s", "tokens/s", 1.0)]),
    ("model FLOPs utilisation", "MFU (%)", [("mfu", "MFU", 100.0)]),
    ("validation perplexity", "perplexity", [("val_ppl", "validation", 1.0)]),
]


def figure(records: list[dict], title: str):
    """A matplotlib figure with one labelled panel per PANELS entry; a panel without data says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (name, ylabel, metrics) in zip(axes.flat, PANELS):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        drawn = 0
        for key, label, scale in metrics:
            steps, values = series(records, key)
            if values:
                style = "o-" if key.startswith("val_") else "-"
                ax.plot(steps, [v * scale for v in values], style, linewidth=1, markersize=3, label=label)
                drawn += 1
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {metrics[0][0]} in metrics.jsonl", ha="center", va="center",
                    transform=ax.transAxes, color="gray")  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str, *, out: str | None = None) -> Path:
    """Draw a run's loss (train, validation) and throughput curves from metrics.jsonl to a PNG.

    Loss (train and validation), learning rate, gradient norm, tokens/s, MFU and validation
    perplexity against step, each on its own labelled axes. Prints the PNG's path and returns it.

    Args:
        run_dir: a run directory holding metrics.jsonl
        out: PNG path (default: RUN_DIR/metrics.png)

    Example:
        llm plot runs/quickstart            # writes runs/quickstart/metrics.png
    """
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    if not series(records, "loss")[1] and not series(records, "val_loss")[1]:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: no 'loss' or 'val_loss' values to plot")
    fig = figure(records, str(Path(run_dir).resolve().name))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(out)
    return out
