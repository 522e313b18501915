"""The last words of benchmarks/gpu_suite.sh: its steps, the kernel rows that matter, the targets, the 2:4 rows.

    python -m llm.bench.suite_summary STEPS.tsv OUT_DIR DRY_RUN(0|1)

Writes gpu_suite-<date>.json next to the kernel results and exits 1 if a step failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm.bench.common import format_table, write_results


def read_steps(path: Path) -> list[dict]:
    steps = []
    for line in path.read_text().splitlines():
        name, status, seconds, detail, command = (line.split("\t") + [""] * 5)[:5]
        steps.append(
            {"step": name, "status": status, "seconds": int(seconds or 0), "detail": detail, "command": command}
        )
    return steps


def newest(out: Path, pattern: str) -> Path | None:
    found = sorted(out.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv: list[str]) -> int:
    steps_path, out, dry_run = Path(argv[0]), Path(argv[1]), argv[2] == "1"
    steps = read_steps(steps_path)
    kernels_path = newest(out, "kernels-*.json")
    kernels = json.loads(kernels_path.read_text()) if kernels_path else {"rows": [], "targets": []}
    sparse_path = newest(out, "sparse_24-*.json")  # folded in here: the device returns at most 8 files
    sparse = json.loads(sparse_path.read_text())["rows"] if sparse_path else []
    path = write_results(
        "gpu_suite",
        steps,
        out,
        dry_run=dry_run,
        kernels_results=kernels_path.name if kernels_path else None,
        targets=kernels.get("targets", []),
        sparse_24=sparse,
    )
    if sparse_path:
        sparse_path.unlink()
    ceilings = kernels.get("ceilings")
    print(format_table(steps, ["step", "status", "seconds", "detail"]))
    if ceilings:
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s")
    if kernels["rows"]:
        columns = ["op", "backend", "pass", "shape", "dtype", "time_ms", "pct_of_ceiling", "vs_torch", "mem_vs_torch"]
        print(format_table(kernels["rows"], columns))
    if kernels.get("targets"):
        print(format_table(kernels["targets"], ["target", "measured", "met"]))
    if sparse:
        print(format_table(sparse, headers={"dense_ms": "dense (ms)", "sparse_ms": "2:4 (ms)"}))
    print(f"suite results: {path}")
    return 1 if any(s["status"] in ("failed", "timeout") for s in steps) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
