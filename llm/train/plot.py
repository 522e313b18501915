"""`llm plot RUN_DIR`: loss and throughput curves of a run, from its metrics.jsonl, to a PNG.

Training records carry `loss` and `tokens_per_s` (and `mfu`); validation records carry `val_loss`.
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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss (train and validation) and throughput (tokens/s, MFU) against step; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    train_steps, train_loss = series(records, "loss")
    val_steps, val_loss = series(records, "val_loss")
    tps_steps, tokens_per_s = series(records, "tokens_per_s")
    mfu_steps, mfu = series(records, "mfu")
    if not train_loss and not val_loss:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: no 'loss' or 'val_loss' values to plot")

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    if train_loss:
        ax_loss.plot(train_steps, train_loss, label="train loss", linewidth=1)
    if val_loss:
        ax_loss.plot(val_steps, val_loss, "o-", label="val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    ax_tps.set_title("throughput")
    ax_tps.set_xlabel("step")
    if tokens_per_s:
        ax_tps.plot(tps_steps, tokens_per_s, color="tab:green", linewidth=1, label="tokens/s")
        ax_tps.set_ylabel("tokens/s (all ranks)")
    if mfu:
        ax_mfu = ax_tps.twinx()
        ax_mfu.plot(mfu_steps, [100 * m for m in mfu], color="tab:red", linewidth=1, label="MFU")
        ax_mfu.set_ylabel("MFU (%)")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
