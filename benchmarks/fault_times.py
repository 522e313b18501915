"""Seconds from a fault in one of 2 CPU ranks to the end of the job, per launcher: rank 1 killed
(SIGKILL) under torchrun, the deepspeed launcher, mpirun and started by hand, and rank 1 frozen
(SIGSTOP) under torchrun with heartbeat_timeout_s=1000 and collective_timeout_s=20. Uses the
processes of tests/train/test_rank_faults.py; writes benchmarks/results/faults-*.json.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/fault_times.py
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.train.test_rank_faults import fault  # noqa: E402

CASES = [
    ("torchrun", "SIGKILL", ["faults.heartbeat_timeout_s=1000"]),
    ("deepspeed", "SIGKILL", ["faults.heartbeat_timeout_s=1000"]),
    ("mpirun", "SIGKILL", ["faults.heartbeat_timeout_s=1000"]),
    ("by-hand", "SIGKILL", ["faults.heartbeat_timeout_s=1000"]),
    ("torchrun", "SIGSTOP", ["faults.heartbeat_timeout_s=1000", "faults.collective_timeout_s=20"]),
]


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="llm-faults-") as tmp:
        for launcher, sig, sets in CASES:
            where = Path(tmp) / f"{launcher}-{sig}"
            where.mkdir()
            status, took, log = fault(where, launcher, getattr(signal, sig), sets)
            line = next((x for x in log.splitlines() if "is lost" in x), "")
            results[f"{launcher} {sig}"] = {"exit_status": status, "seconds_to_exit": round(took, 1), "line": line}
            print(f"{launcher:10s} {sig}: exit {status} after {took:.1f} s  {line}", flush=True)
    out = ROOT / "benchmarks" / "results" / f"faults-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "what": "seconds from signalling rank 1 of 2 CPU ranks to the exit of the job's launcher",
                "command": "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/fault_times.py",
                "host": platform.node(),
                "cpu_count": os.cpu_count(),
                "load_average_1_5_15min": list(os.getloadavg()),
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
