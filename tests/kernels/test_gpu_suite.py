"""benchmarks/gpu_suite.sh --dry-run runs every step in its cheap form on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the suite's bench must not lean on the interpreter
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].startswith("suite results:")
    suite = json.loads(next(tmp_path.glob("gpu_suite-*.json")).read_text())
    assert suite["dry_run"] is True
    steps = ["build csrc", "gpu tests", "bench kernels", "sparse 2:4", "bench train", "bench sequence"]
    assert [s["step"] for s in suite["rows"]] == steps
    assert all(s["status"] == "ok" for s in suite["rows"])
    kernels = json.loads((tmp_path / suite["kernels_results"]).read_text())
    assert {r["op"] for r in kernels["rows"]} == {"rms_norm", "linear_cross_entropy"}
    assert all(r["backend"] == "torch" and r["time_ms"] > 0 for r in kernels["rows"])
    assert "needs a GPU" in kernels["not_run"]["rms_norm"]["triton"]
    assert list(tmp_path.glob("kernels-*.png"))
    assert [r["kept_per_4"] for r in suite["sparse_24"]] == [2.0, 2.0, 2.0]  # folded into the suite's JSON
    assert not list(tmp_path.glob("sparse_24-*.json"))


def test_gpu_suite_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
