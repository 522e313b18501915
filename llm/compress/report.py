"""What `llm compress report` measures and writes: size on disk, parameters, the fraction of zeros among the
blocks' Linear weights (unstructured and n:m pruning store zeros densely), CPU speed and quality of compressed
variants against their original; a table, JSON and a PNG.

Speed (measured by llm.bench.inference, with the peers and the bandwidth limit) of a language model is
greedy generation of the same prompt for the same number of new tokens (KV cache on, batch 1), in
tokens/s; of any other model (a classifier) the forward pass over the same batch of held-out examples,
in examples/s.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from llm.fileio import write_atomic

WEIGHT_FILES = ("model.safetensors", "config.yaml")


def size_on_disk(path: str | Path) -> int:
    """Bytes of a model directory's weights and config (the tokenizer is left out: it is shared)."""
    path = Path(path)
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:  # a Hugging Face directory or a checkpoint: every file
        files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


SPEED = (("tokens_per_s", "tok/s", "CPU generation (tokens/s)"), ("examples_per_s", "ex/s", "CPU forward (examples/s)"))


def speed_key(row: dict) -> tuple[str, str, str]:
    """(row key, short label, long label) of a row's speed: generation tokens/s for language models,
    forward examples/s otherwise; a row with neither reports tokens/s (NaN)."""
    for key, short, long in SPEED:
        if key in row and row[key] == row[key]:  # present and not NaN
            return key, short, long
    return SPEED[0]


def environment() -> dict:
    import torch as t

    versions = {"torch": t.__version__, "python": platform.python_version()}
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": t.get_num_threads(),
        "versions": versions,
    }


QUALITY = (("ppl", "perplexity", False), ("accuracy", "accuracy", True))


def quality_key(row: dict) -> tuple[str, str, bool]:
    """(metric key, label, higher is better) of a row: perplexity for language models, else accuracy."""
    for key, label, higher in QUALITY:
        if key in row.get("metrics", {}):
            return key, label, higher
    return "loss", "loss", False


def table(rows: list[dict]) -> str:
    """A fixed-width text table of the report rows; the first row is the original."""
    base = rows[0]
    key, label, _ = quality_key(base)
    speed, speed_label, _ = speed_key(base)
    head = (
        f"{'variant':<28} {'size MB':>9} {'x smaller':>9} {'params':>11} {'zeros':>6} {speed_label:>8} {label:>11} "
        f"{'vs orig':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        q, q0 = r["metrics"].get(key), base["metrics"].get(key)
        rel = f"{(q / q0 - 1) * 100:+.2f}%" if q is not None and q0 else "n/a"
        if key == "accuracy" and q is not None:
            rel = f"{(q - q0) * 100:+.2f}pt"
        lines.append(
            f"{r['name']:<28} {r['size_bytes'] / 1e6:>9.3f} {base['size_bytes'] / r['size_bytes']:>9.2f} "
            f"{r['parameters']:>11,} {r.get('sparsity', 0.0):>6.1%} {r.get(speed, float('nan')):>8.1f} "
            f"{q if q is not None else float('nan'):>11.4f} {rel:>8}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Three bar charts side by side (size, speed, quality), the original first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, _ = quality_key(rows[0])
    speed, _, speed_label = speed_key(rows[0])
    names = [r["name"] for r in rows]
    values = [
        ("size on disk (MB)", [r["size_bytes"] / 1e6 for r in rows]),
        (speed_label, [r.get(speed, float("nan")) for r in rows]),
        (label, [r["metrics"].get(key, float("nan")) for r in rows]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(rows) + 2.5))
    for ax, (what, vals) in zip(axes, values):
        colours = ["#555555"] + ["#1f77b4"] * (len(rows) - 1)
        ax.barh(names[::-1], vals[::-1], color=colours[::-1])
        ax.set_title(what)
        for y, v in enumerate(vals[::-1]):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: str | Path, meta: dict) -> dict[str, Path]:
    """report.txt, report.json (rows + hardware, versions, command) and report.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "report.txt", "json": out / "report.json", "png": out / "report.png"}
    write_atomic(paths["table"], table(rows) + "\n")
    write_atomic(paths["json"], json.dumps({**meta, "environment": environment(), "rows": rows}, indent=2) + "\n")
    plot(rows, paths["png"], f"compression report: {rows[0]['name']}")
    return paths
