"""Throughput, MFU and the run's metrics file (metrics.jsonl, mirrored to the trackers).

MFU = achieved model FLOPs / peak FLOPs. Model FLOPs per token come from
`llm.models.info.training_flops_per_token` (6 per matmul parameter plus
attention); the peak is the device's dense bf16/fp16 tensor-core figure from the
table below (fp32 uses the TF32 figure), or on a CPU a measured matmul peak,
cached per host so each run does not pay for it again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from llm.fileio import write_atomic
from llm.log import logger

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16, tf32) from the vendors' data sheets.
DEVICE_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
    "T4": (65.0, 8.1),
}

CACHE = Path(os.environ.get("LLM_CACHE", Path.home() / ".cache" / "llm"))


def cpu_matmul_peak(size: int = 512, trials: int = 5, seconds: float = 0.1) -> float:
    """Measured fp32 matmul FLOP/s of this process (its threads), the best of a few short trials
    (a busy machine only slows some), cached per host and thread count."""
    key = f"{platform.node()}-{torch.get_num_threads()}threads"
    path = CACHE / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    peak = 0.0
    for _ in range(trials):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        peak = max(peak, 2 * size**3 * n / (time.perf_counter() - start))
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached[key] = peak
        write_atomic(path, json.dumps(cached, indent=1))
    except OSError:
        pass
    return peak


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for one rank's device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in DEVICE_PEAK_TFLOPS.items():
            if key.lower() in name.lower():
                return (half if precision in ("bf16", "fp16") else tf32) * 1e12, f"table: {key}"
        return 0.0, f"unknown device {name!r}"
    return cpu_matmul_peak(), "measured cpu matmul"


def memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class MetricsWriter:
    """Rank 0 appends one JSON object per logged step to metrics.jsonl and mirrors it to the
    `trackers` (TensorBoard, W&B, MLflow: objects with `name`, write(record) and close(), see
    `llm.train.trackers`).

    A line is appended whole or not at all: one write(2) on an O_APPEND descriptor, and when it
    fails part-way (full disk, quota) the file is cut back to its previous length and a warning
    says what was lost. A half line left by a crash is cut off when the file is next opened. A
    tracker that fails is switched off with one warning; metrics.jsonl goes on."""

    def __init__(self, run_dir: Path, trackers: list | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair()
        self.trackers = list(trackers or [])

    def _repair(self) -> None:
        size = os.fstat(self.fd).st_size
        if not size:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - (1 << 16)))
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        if keep == 0 and size > len(tail):  # no newline in the last 64 KiB: find the last one
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
        os.ftruncate(self.fd, keep)
        logger.warning(f"{self.path}: removed a half-written last line ({size - keep} bytes) from an earlier run")

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes")
        except OSError as e:
            os.ftruncate(self.fd, size)
            logger.warning(f"{self.path}: could not append step {record.get('step')} ({e}); the file is as it was")
            return
        self._each_tracker(lambda tracker: tracker.write(record))

    def _each_tracker(self, call) -> None:
        from llm.train.trackers import switched_off

        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # each tracker's library raises its own types
                self.trackers.remove(tracker)
                switched_off(tracker.name, e)

    def close(self) -> None:
        os.close(self.fd)
        self._each_tracker(lambda tracker: tracker.close())

    @classmethod
    def for_recipe(cls, recipe) -> MetricsWriter:
        """The writer of a run: metrics.jsonl and the trackers `recipe.logging` turns on."""
        import dataclasses

        from llm.train.trackers import open_trackers

        return cls(
            Path(recipe.run_dir), open_trackers(recipe.logging, Path(recipe.run_dir), dataclasses.asdict(recipe))
        )


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
