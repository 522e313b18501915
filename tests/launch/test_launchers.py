"""The launch scripts start 2 CPU ranks of `llm pretrain` on a tiny recipe and run it to completion."""

from __future__ import annotations

import math
import socket
import subprocess

import pytest

from tests.launch.conftest import REPO, launch_env, ranks_that_ran, read_losses

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _check_run(run_dir, steps: int = 3) -> None:
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert ranks_that_ran(run_dir) == {0, 1}


@pytest.mark.parametrize(
    "script, env",
    [
        ("launch/deepspeed.sh", {"NUM_GPUS": "2"}),
        ("launch/torchrun.sh", {"NPROC_PER_NODE": "2"}),
        ("launch/mpirun.sh", {"NP": "2", "MPI_ARGS": "--oversubscribe"}),
    ],
    ids=["deepspeed", "torchrun", "mpirun"],
)
def test_launcher_runs_two_ranks(tiny_recipe, script, env):
    recipe, run_dir = tiny_recipe()
    _run([f"launch/{script.split('/')[1]}", str(recipe)], launch_env(MASTER_PORT=str(_free_port()), **env))
    _check_run(run_dir)


def test_deepspeed_hostfile_of_this_machine(tiny_recipe, tmp_path):
    """A hostfile naming only localhost launches locally (no ssh once the check is off)."""
    recipe, run_dir = tiny_recipe()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = launch_env(
        HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), DS_ARGS="--no_ssh_check"
    )
    _run(["launch/deepspeed.sh", str(recipe)], env)
    _check_run(run_dir)
