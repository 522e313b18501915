"""A real single-node Slurm (munged, slurmctld, slurmd) runs launch/slurm/pretrain.sbatch with 2 tasks."""

from __future__ import annotations

import math
import os
import shutil
import time

import pytest

from tests.launch.conftest import REPO, launch_env, ranks_that_ran, read_losses
from tests.launch.slurm_cluster import SlurmCluster, missing_tools

pytestmark = pytest.mark.distributed

SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
CPU_ALLOCATION = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    if missing:
        can_install = os.geteuid() == 0 and shutil.which("apt-get")
        message = f"Slurm tools missing: {', '.join(missing)} (scripts/install_testcluster.sh installs them)"
        if can_install:
            pytest.fail(message)  # `make test` installs them here, so their absence is a failure
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons run as root in this test")
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2) as cluster:
        yield cluster


def logged_a_step(run_dir) -> bool:
    """Whether metrics.jsonl holds a complete line with a loss yet (rank 0 is writing it as we look)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return any('"loss"' in line for line in text.split("\n")[:-1])


def test_sbatch_two_tasks_to_completion(slurm, tiny_recipe, tmp_path):
    recipe, run_dir = tiny_recipe()
    log = tmp_path / "job.out"
    job = slurm.sbatch(*CPU_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path, env=launch_env())
    state = slurm.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{slurm.logs()}"
    assert "1 node(s), 2 ranks, master" in output
    losses = read_losses(run_dir)  # rank 0 writes metrics.jsonl
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert ranks_that_ran(run_dir) == {0, 1}


def test_preemption_checkpoints_requeues_and_resumes(slurm, tiny_recipe, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): ranks checkpoint, the job requeues and
    resumes from that checkpoint to max_steps."""
    max_steps = 100
    recipe, run_dir = tiny_recipe(max_steps=max_steps, log_every=1)
    log = tmp_path / "job.out"
    job = slurm.sbatch(*CPU_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path, env=launch_env())

    deadline = time.monotonic() + 240
    while not logged_a_step(run_dir):
        assert time.monotonic() < deadline, f"no training step logged\n{log.read_text()[-3000:]}"
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.5)
    slurm.signal_batch(job, "USR1")
    while slurm.restarts(job) == 0:  # the script requeues the job once the ranks have checkpointed
        assert time.monotonic() < deadline, f"job not requeued\n{log.read_text()[-3000:]}"
        assert slurm.job_state(job) in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), log.read_text()[-3000:]
        time.sleep(0.5)
    # a requeued job waits out the credential lifetime (cred_expire=10 in the test's slurm.conf), then restarts

    state = slurm.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{slurm.logs()}"
    assert "restart 0:" in output and "restart 1:" in output, output[-4000:]
    assert "USR1 received: checkpoint at step" in output
    stopped_at = int(output.split("USR1 received: checkpoint at step")[1].split(",")[0])
    assert 1 <= stopped_at < max_steps
    losses = read_losses(run_dir)
    # the first run logged steps 1..stopped_at, the resumed run the rest, each step once
    assert sorted(losses) == list(range(1, max_steps + 1))
    assert ranks_that_ran(run_dir) == {0, 1}
