"""Every launcher across a real two-node cluster (tests/launch/testcluster.py: network + UTS + mount namespaces,
sshd, munge and Slurm on this machine), one CPU rank per node, the tiny GPT under ZeRO-2 and ZeRO-3.

A 2-node run's losses match one process with the same global batch (2 ranks x micro batch 2 = 4). Killing every
process of one node mid-run ends the job within 60 s naming that node and its rank, and the run resumes on the
remaining node from the last checkpoint with the losses of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.conftest import REPO, launch_env, ranks_that_ran, read_losses
from tests.launch.testcluster import IFNAME, TwoNodeCluster, cannot_create_namespaces, missing_tools
from tests.train.helpers import PYTHON, TINY, losses, run, write_recipe

pytestmark = pytest.mark.distributed

SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 3  # a launcher run
KILL_TIMEOUT_S = 10  # faults.heartbeat_timeout_s in the node-kill runs
SAVE_EVERY = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = cannot_create_namespaces()
    if why:
        pytest.skip(f"two-node cluster needs network namespaces: {why}")
    missing = missing_tools()
    if missing:  # root can install them (scripts/install_testcluster.sh, run by `make test`)
        pytest.fail(f"tools missing for the two-node cluster: {', '.join(missing)} (scripts/install_testcluster.sh)")
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster.up()
    finally:
        cluster.down()


def recipe_for(tmp_path: Path, **sets) -> tuple[Path, Path]:
    """The tiny recipe with micro batch 2 per rank, run_dir under tmp_path; `sets` as dotted keys."""
    recipe = yaml.safe_load(yaml.safe_dump(TINY))
    recipe.update(run_dir=str(tmp_path / "run"), checkpoint={"save_final": False})
    recipe["logging"] = {"tensorboard": False, "progress": False}
    recipe["train"].update(micro_batch_size=2, max_steps=STEPS)
    for key, value in sets.items():
        section, name = key.split("__")
        recipe.setdefault(section, {})[name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, micro batch 4: what 2 ranks x micro batch 2 see, step for step."""

    def make(**sets) -> dict[int, float]:
        d = tmp_path_factory.mktemp("ref")
        recipe, run_dir = recipe_for(d, **sets)
        run(recipe, 1, "train.micro_batch_size=4", resume="none")
        return losses(run_dir)

    cache: dict[tuple, dict[int, float]] = {}

    def get(**sets) -> dict[int, float]:
        key = tuple(sorted(sets.items()))
        if key not in cache:
            cache[key] = make(**sets)
        return cache[key]

    return get


def node_env(cluster: TwoNodeCluster, **extra: str) -> dict[str, str]:
    """What a rank on a node needs: launch_env, the link's interface for gloo, the cluster's Slurm."""
    return launch_env(GLOO_SOCKET_IFNAME=IFNAME, SLURM_CONF=cluster.env["SLURM_CONF"], **extra)


def assert_matches(run_dir: Path, ref: dict[int, float], tol: float = 1e-5) -> None:
    got = read_losses(run_dir)
    assert sorted(got) == sorted(ref), (got, ref)
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < tol, (step, got[step], ref[step])
    assert ranks_that_ran(run_dir) == {0, 1}
    hosts = {int(p.name.split("_")[1]): p.read_text().split()[-1] for p in (run_dir / "heartbeat").glob("rank_*")}
    assert sorted(hosts.values()) == ["llm-n1", "llm-n2"], hosts  # one rank on each node


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                _killpg(p)
            raise
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert all(p.returncode == 0 for p in procs), text


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# -- the launchers, 2 nodes x 1 rank ---------------------------------------------------------------


def start_torchrun(cluster, recipe, log_dir: Path, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """The same command on both nodes; c10d rendezvous served by node 1's agent."""
    env = node_env(cluster, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{cluster.hosts[1]}:29400", RDZV_ID="t")
    logs = [log_dir / f"torchrun-n{n}.log" for n in (1, 2)]
    cmd = [str(REPO / "launch" / "torchrun.sh"), str(recipe), *args]
    return [cluster.popen(n, cmd, logs[n - 1], cwd=REPO, env=env) for n in (1, 2)], logs


def start_deepspeed(cluster, recipe, log_dir: Path, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """On node 1 with a hostfile of both nodes, 1 slot each: the launcher reaches them over ssh (pdsh)."""
    hostfile = log_dir / "hostfile"
    hostfile.write_text("".join(f"{cluster.hosts[n]} slots=1\n" for n in (1, 2)))
    env = node_env(cluster, HOSTFILE=str(hostfile), MASTER_ADDR=cluster.hosts[1], MASTER_PORT="29401")
    log = log_dir / "deepspeed.log"
    return [cluster.popen(1, [str(REPO / "launch" / "deepspeed.sh"), str(recipe), *args], log, cwd=REPO, env=env)], [log]


def start_mpirun(cluster, recipe, log_dir: Path, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """mpirun on node 1 over an Open MPI hostfile of both nodes (ssh starts the remote daemon)."""
    hostfile = log_dir / "mpi-hosts"
    hostfile.write_text("".join(f"{cluster.hosts[n]} slots=1\n" for n in (1, 2)))
    env = node_env(cluster, NP="2", HOSTFILE=str(hostfile), MASTER_PORT="29402")
    log = log_dir / "mpirun.log"
    return [cluster.popen(1, [str(REPO / "launch" / "mpirun.sh"), str(recipe), *args], log, cwd=REPO, env=env)], [log]


LAUNCHERS = {"torchrun": start_torchrun, "deepspeed": start_deepspeed, "mpirun": start_mpirun}


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_across_two_nodes_matches_one_process(cluster, reference, tmp_path, launcher, stage):
    recipe, run_dir = recipe_for(tmp_path, deepspeed__zero_stage=stage)
    procs, logs = LAUNCHERS[launcher](cluster, recipe, tmp_path, "--resume", "none")
    finish(procs, logs)
    assert_matches(run_dir, reference())


# -- Slurm: sbatch --nodes=2 ----------------------------------------------------------------------

SLURM_ALLOCATION = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.mark.parametrize("stage", [2, 3])
def test_sbatch_two_nodes_to_completion(cluster, reference, tmp_path, stage):
    recipe, run_dir = recipe_for(tmp_path, deepspeed__zero_stage=stage)
    log = tmp_path / "job.out"
    job = cluster.sbatch(*SLURM_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path,
                         env=node_env(cluster))  # fmt: skip
    state = cluster.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{cluster.logs()}"
    assert f"2 node(s), 2 ranks, master {cluster.hosts[1]}" in output
    assert_matches(run_dir, reference())
