"""A killed or frozen rank ends the job, naming the rank and its host, under each way of starting
ranks: torchrun, the deepspeed launcher, mpirun, and ranks started by hand (real processes)."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.helpers import PYTHON, ROOT, TINY, command, descendants, env, losses, write_recipe

pytestmark = pytest.mark.distributed

BIN = Path(PYTHON).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(launcher: str, recipe: Path, sets: list[str], log) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """The job's process (what a user waits on) and, for ranks started by hand, every rank's process."""
    args = ["pretrain", str(recipe), *[x for s in sets for x in ("--set", s)], "--resume", "none"]
    e, port = env(), str(free_port())
    opts = dict(cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    if launcher == "torchrun":
        return subprocess.Popen(command(recipe, 2, *sets, resume="none"), env=e, **opts), []
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", port, "--module", "llm"]
        return subprocess.Popen([*cmd, *args], env=e, **opts), []
    if launcher == "mpirun":
        cmd = [str(BIN / "mpirun"), "-n", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
        cmd += [
            x for var in ("PATH", "PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "MASTER_PORT") for x in ("-x", var)
        ]
        return subprocess.Popen([*cmd, PYTHON, "-m", "llm", *args], env={**e, "MASTER_PORT": port}, **opts), []
    ranks = [
        subprocess.Popen(
            [PYTHON, "-m", "llm", *args],
            env={
                **e,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            **opts,
        )
        for r in range(2)
    ]
    return ranks[0], ranks


def rank_one(job: subprocess.Popen, ranks: list[subprocess.Popen]) -> int:
    if ranks:
        return ranks[1].pid
    for pid in descendants(job.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"llm" in cmdline and (b"RANK=1" in environ or b"OMPI_COMM_WORLD_RANK=1" in environ):
            return pid
    raise AssertionError("rank 1 not found")


def fault(tmp_path, launcher: str, sig: signal.Signals, sets: list[str]) -> tuple[int, float, str]:
    """Start 2 ranks, send `sig` to rank 1 once training runs; (exit status, seconds to exit, log)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "train.max_steps=100000", "train.micro_batch_size=2", "logging.progress=false", *sets]
    with open(tmp_path / "log", "w") as log:
        job, ranks = start(launcher, recipe, sets, log)
        everyone = [job, *ranks]
        try:
            deadline = time.time() + 240
            while not (run_dir / "metrics.jsonl").is_file() or not losses(run_dir):
                assert job.poll() is None and time.time() < deadline, "training did not start"
                time.sleep(0.2)
            os.kill(rank_one(job, ranks), sig)
            sent = time.time()
            status = job.wait(timeout=150)
            took = time.time() - sent
        finally:
            for p in everyone:
                for pid in [p.pid, *descendants(p.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    return status, took, (tmp_path / "log").read_text()


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", "by-hand"])
def test_a_killed_rank_is_named_under_every_launcher(tmp_path, launcher):
    status, took, log = fault(tmp_path, launcher, signal.SIGKILL, ["faults.heartbeat_timeout_s=1000"])
    assert status != 0
    host = socket.gethostname()
    assert "rank 1 (pid " in log and f" on {host}) is lost: its process has exited" in log, log[-3000:]
    assert "Traceback" not in log.split("is lost")[0][-2000:]  # the first word on it is ours, not a traceback
    assert took < 60, took


def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    timeout = 20
    sets = ["faults.heartbeat_timeout_s=1000", f"faults.collective_timeout_s={timeout}"]
    status, took, log = fault(tmp_path, "torchrun", signal.SIGSTOP, sets)
    assert status != 0
    assert "rank 1 (pid " in log and "is stopped" in log, log[-3000:]
    assert took < timeout + 30, took  # the bound: max(heartbeat, collective timeout) + 30 s, here tighter
