"""Every launcher across a real two-node cluster (tests/launch/testcluster.py: network + UTS + mount namespaces,
sshd, munge and Slurm on this machine), one CPU rank per node, the tiny GPT under ZeRO-2 and ZeRO-3.

A 2-node run's losses match one process with the same global batch (2 ranks x micro batch 2 = 4). Killing every
process of one node mid-run ends the job within 60 s naming that node and its rank, and the run resumes on the
remaining node from the last checkpoint with the losses of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.conftest import REPO, launch_env, ranks_that_ran, read_losses
from tests.launch.testcluster import IFNAME, TwoNodeCluster, cannot_create_namespaces, missing_tools
from tests.train.helpers import PYTHON, TINY, command, losses

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

    def interrupted(signum, frame):  # SIGTERM to pytest: still tear the cluster down
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield cluster.up()
    finally:
        cluster.down()
        signal.signal(signal.SIGTERM, previous)


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
        # the ranks' environment (launch_env): the same PATH, so the same ninja checks DeepSpeed's JIT-built op
        # (another ninja would rebuild it)
        cmd = command(recipe, 1, "train.micro_batch_size=4", resume="none")
        out = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
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
    return [cluster.popen(1, [str(REPO / "launch" / "deepspeed.sh"), str(recipe), *args], log, cwd=REPO, env=env)], [
        log
    ]


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
    job = cluster.sbatch(
        *SLURM_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path, env=node_env(cluster)
    )
    state = cluster.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{cluster.logs()}"
    assert f"2 node(s), 2 ranks, master {cluster.hosts[1]}" in output
    assert_matches(run_dir, reference())


def logged_step(run_dir: Path, at_least: int = 1) -> bool:
    """Whether metrics.jsonl holds a complete line with step >= at_least (rank 0 is writing it as we look)."""
    path = run_dir / "metrics.jsonl"
    lines = (path.read_text() if path.exists() else "").split("\n")[:-1]
    return any('"loss"' in line and int(re.search(r'"step": (\d+)', line).group(1)) >= at_least for line in lines)


def test_sbatch_two_nodes_preempted_requeues_and_resumes(cluster, reference, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): both ranks checkpoint, the job requeues and
    resumes on both nodes from that checkpoint; the losses are those of an uninterrupted run."""
    max_steps = 40
    recipe, run_dir = recipe_for(tmp_path, train__max_steps=max_steps, deepspeed__zero_stage=2)
    log = tmp_path / "job.out"
    job = cluster.sbatch(
        *SLURM_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path, env=node_env(cluster)
    )
    deadline = time.monotonic() + 240
    while not logged_step(run_dir):
        assert time.monotonic() < deadline, f"no training step logged\n{log.read_text()[-3000:]}"
        assert cluster.job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.3)
    cluster.run(1, ["scancel", "--batch", "--signal=USR1", str(job)])
    while cluster.job_field(job, "Restarts") in ("0", "UNKNOWN"):
        assert time.monotonic() < deadline, f"job not requeued\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    # the requeued job waits out the credential lifetime (cred_expire=10 in the cluster's slurm.conf), then
    # restarts; forcing StartTime=now races the revoked credential ("Killing non-startable batch job")
    state = cluster.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{cluster.logs()}"
    assert "restart 0: 2 node(s)" in output and "restart 1: 2 node(s)" in output, output[-4000:]
    stopped_at = int(output.split("USR1 received: checkpoint at step")[1].split(",")[0])
    assert 1 <= stopped_at < max_steps
    assert_matches(run_dir, reference(train__max_steps=max_steps, deepspeed__zero_stage=2))


# -- a node dies: every process on node 2 SIGKILLed mid-run -----------------------------------------

KILL_RUN = dict(
    train__max_steps=60,
    schedule__decay="constant",
    checkpoint__every_steps=SAVE_EVERY,
    checkpoint__save_final=False,
    faults__heartbeat_timeout_s=KILL_TIMEOUT_S,
    deepspeed__zero_stage=0,  # resuming a 2-rank ZeRO-2/3 checkpoint on 1 rank is elastic resume (issue 12)
)


def rank_hosts(run_dir: Path) -> dict[int, str]:
    beats = {int(p.name.split("_")[1]): p.read_text().split() for p in (run_dir / "heartbeat").glob("rank_?")}
    return {r: words[-1] for r, words in beats.items() if words}


def resume_on_node_one(cluster):
    def resume(recipe: Path) -> None:
        cmd = [PYTHON, "-m", "llm", "pretrain", str(recipe), "--set", "train.micro_batch_size=4", "--resume", "auto"]
        out = cluster.run(1, cmd, cwd=REPO, env=node_env(cluster), timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]

    return resume


def kill_node_and_resume(
    cluster, reference, tmp_path, launcher, start_job, job_ended, job_output, resume_alone, after_kill=None
) -> None:
    recipe, run_dir = recipe_for(tmp_path, **KILL_RUN)
    start_job(recipe)
    deadline = time.monotonic() + 240
    while not logged_step(run_dir, SAVE_EVERY + 2):
        assert time.monotonic() < deadline and not job_ended(), f"training did not start\n{job_output()[-3000:]}"
        time.sleep(0.3)
    victim = next(r for r, h in rank_hosts(run_dir).items() if h == cluster.hosts[2])
    cluster.kill_node(2)
    killed = time.monotonic()
    while not job_ended():
        assert time.monotonic() - killed < 60, f"job still running 60 s after node 2 died\n{job_output()[-3000:]}"
        time.sleep(0.3)
    ended_after = time.monotonic() - killed
    if after_kill is not None:
        after_kill()
    output = job_output()
    found = re.search(rf"rank {victim} \(pid \d+ on {cluster.hosts[2]}\)", output)
    named = found.group(0) if found else f"rank {victim} (pid ... on {cluster.hosts[2]})"
    if named not in output and launcher == "mpirun":
        # mpirun notices its daemon on llm-n2 gone and kills the ranks itself, naming the node, before a rank can
        found = re.search(rf"(Remote host:\s+|Remote daemon: .* on node ){cluster.hosts[2]}\b", output)
        named = found.group(0) if found else named
    assert named in output, output[-4000:]
    print(f"node-kill ({launcher}): job ended {ended_after:.1f} s after node 2 died: {named}")

    # the remaining node resumes alone, with the same global batch (1 rank x micro batch 4)
    saved = sorted(int(p.name.split("_")[-1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved, list(run_dir.iterdir())
    before = read_losses(run_dir)
    resume_alone(recipe)
    ref = reference(**KILL_RUN)
    got = read_losses(run_dir)  # steps after the last checkpoint are logged again by the resumed run
    assert sorted(got) == sorted(ref) and max(before) >= saved[-1]
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < 1e-4, (step, got[step], ref[step])


@pytest.fixture
def node_two(cluster):
    """Node 2 is back (sshd, slurmd) after a test that killed it."""
    yield
    if 2 not in cluster.init_pids:
        cluster.start_node(2)
    if "slurmd-n2" not in cluster.daemons:
        cluster.start_slurmd(2)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_node_killed_ends_the_job_naming_it_and_the_run_resumes_on_one_node(
    cluster, reference, tmp_path, launcher, node_two
):
    started: list[tuple[list[subprocess.Popen], list[Path]]] = []

    def start(recipe):
        started.append(LAUNCHERS[launcher](cluster, recipe, tmp_path, "--resume", "none"))

    def ended() -> bool:  # the launcher on node 1 has exited (node 2's died with the node)
        procs = started[0][0]
        return procs[0].poll() is not None

    def output() -> str:
        return "\n".join(log.read_text() for log in started[0][1] if log.exists())

    try:
        kill_node_and_resume(cluster, reference, tmp_path, launcher, start, ended, output, resume_on_node_one(cluster))
    finally:
        for proc in started[0][0] if started else []:
            _killpg(proc)


def test_sbatch_node_killed_ends_the_job_naming_it_and_resumes_on_one_node(cluster, reference, tmp_path, node_two):
    """The job's step ends within 60 s of node 2 dying; `sbatch --nodes=1` resumes on node 1 from the checkpoint."""
    log = tmp_path / "job.out"
    jobs: list[int] = []

    def start(recipe):
        jobs.append(
            cluster.sbatch(
                *SLURM_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), cwd=tmp_path, env=node_env(cluster)
            )
        )

    def ended() -> bool:  # the job left RUNNING: failed, or requeued (--requeue) once Slurm saw the node fail
        state, restarts = cluster.job_field(jobs[0], "JobState"), cluster.job_field(jobs[0], "Restarts")
        return state not in ("PENDING", "RUNNING", "CONFIGURING") or restarts not in ("0", "UNKNOWN")

    def cancel_requeued():  # it would run again on both nodes once node 2 is back; this run resumes on node 1
        cluster.run(1, ["scancel", str(jobs[0])], check=False)
        cluster.wait_job(jobs[0], timeout=60)

    def output() -> str:
        return log.read_text() if log.exists() else ""

    def resume(recipe):
        one = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", f"--nodelist={cluster.hosts[1]}"]
        job = cluster.sbatch(
            *one,
            f"--output={tmp_path / 'resume.out'}",
            str(SBATCH),
            str(recipe),
            "--set",
            "train.micro_batch_size=4",
            cwd=tmp_path,
            env=node_env(cluster),
        )
        state = cluster.wait_job(job, timeout=300)
        assert state == "COMPLETED", f"{state}\n{(tmp_path / 'resume.out').read_text()[-3000:]}\n{cluster.logs()}"

    try:
        kill_node_and_resume(cluster, reference, tmp_path, "slurm", start, ended, output, resume, cancel_requeued)
    finally:
        for job in jobs:
            cluster.run(1, ["scancel", str(job)], check=False)
