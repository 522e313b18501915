"""What every benchmark suite shares: the environment record, timing, the table, the JSON."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks/results")


def environment() -> dict:
    """Hardware and software versions, recorded with every result."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for pkg in ("triton", "deepspeed", "transformers", "flash-attn", "apex", "pyarrow", "numpy"):
        env[pkg] = version(pkg)
    return env


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> list[float]:
    """Seconds per call for `repeat` calls after `warmup`, synchronising a GPU around each."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_number(value: float) -> str:
    """A float in fixed notation with about 4 significant digits and thousands separators, never an
    exponent (tables give their units in the header: M tok/s, GB/s, ms)."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    decimals = 3 - int(math.floor(math.log10(magnitude)))
    return f"{value:.{min(decimals, 6)}f}"


def format_table(
    rows: list[dict],
    columns: list[str] | None = None,
    headers: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
) -> str:
    """A plain-text table of `rows` (dicts) over `columns`. `headers` renames columns (with their units,
    e.g. {"time_ms": "time (ms)"}); `notes` gives a derived column a numbered footnote printed under
    the table, saying how it is computed. Floats are fixed-point (`format_number`)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    headers, notes = headers or {}, notes or {}
    marks = {c: f" [{i}]" for i, c in enumerate((c for c in columns if c in notes), 1)}
    titles = [headers.get(c, c) + marks.get(c, "") for c in columns]

    def cell(value) -> str:
        if isinstance(value, float):
            return format_number(value)
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(t), *(len(row[i]) for row in cells)) for i, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    for column, mark in marks.items():
        lines.append(f"{mark.strip()} {headers.get(column, column)}: {notes[column]}")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], out_dir: str | Path | None = None, **extra) -> Path:
    """Write {suite, command, environment, rows, ...} to <out_dir>/<name>-<date>.json.

    out_dir defaults to $OUT (the GPU suite's output folder) or benchmarks/results/.
    """
    out = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = out / f"{name}-{stamp}.json"
    record = {"suite": name, "command": " ".join(sys.argv), "environment": env, **extra, "rows": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
