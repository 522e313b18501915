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
PREEMPT_RUN = dict(train__max_steps=40, deepspeed__zero_stage=2)
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


class References:
    """One-process runs with micro batch 4: what 2 ranks x micro batch 2 see, step for step. Each runs in the
    background from `start` (the known ones start with the module, beside the cluster's start-up)."""

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[tuple, tuple[subprocess.Popen, Path, Path]] = {}

    def start(self, **sets) -> None:
        key = tuple(sorted(sets.items()))
        if key in self.runs:
            return
        d = self.root / f"ref{len(self.runs)}"
        d.mkdir()
        recipe, run_dir = recipe_for(d, **sets)
        # the ranks' environment (launch_env): the same PATH, so the same ninja checks DeepSpeed's JIT-built op
        # (another ninja would rebuild it)
        cmd = command(recipe, 1, "train.micro_batch_size=4", resume="none")
        with open(d / "out.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT)
        self.runs[key] = (proc, run_dir, d / "out.log")

    def __call__(self, **sets) -> dict[int, float]:
        self.start(**sets)
        proc, run_dir, log = self.runs[tuple(sorted(sets.items()))]
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        return losses(run_dir)

    def close(self) -> None:
        for proc, _, _ in self.runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    refs = References(tmp_path_factory.mktemp("references"))
    refs.start()
    refs.start(**PREEMPT_RUN)
    yield refs
    refs.close()


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
# Each starter returns the processes it started on this machine and their logs; `port` keeps runs that share the
# cluster at the same time apart.


def start_torchrun(cluster, recipe, log_dir: Path, port: int, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """The same command on both nodes; c10d rendezvous served by node 1's agent."""
    env = node_env(
        cluster, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{cluster.hosts[1]}:{port}", RDZV_ID=f"t{port}"
    )
    logs = [log_dir / f"torchrun-n{n}.log" for n in (1, 2)]
    cmd = [str(REPO / "launch" / "torchrun.sh"), str(recipe), *args]
    return [cluster.popen(n, cmd, logs[n - 1], cwd=REPO, env=env) for n in (1, 2)], logs


def start_deepspeed(cluster, recipe, log_dir: Path, port: int, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """On node 1 with a hostfile of both nodes, 1 slot each: the launcher reaches them over ssh (pdsh)."""
    hostfile = log_dir / "hostfile"
    hostfile.write_text("".join(f"{cluster.hosts[n]} slots=1\n" for n in (1, 2)))
    env = node_env(cluster, HOSTFILE=str(hostfile), MASTER_ADDR=cluster.hosts[1], MASTER_PORT=str(port))
    log = log_dir / "deepspeed.log"
    cmd = [str(REPO / "launch" / "deepspeed.sh"), str(recipe), *args]
    return [cluster.popen(1, cmd, log, cwd=REPO, env=env)], [log]


def start_mpirun(cluster, recipe, log_dir: Path, port: int, *args: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """mpirun on node 1 over an Open MPI hostfile of both nodes (ssh starts the remote daemon)."""
    hostfile = log_dir / "mpi-hosts"
    hostfile.write_text("".join(f"{cluster.hosts[n]} slots=1\n" for n in (1, 2)))
    env = node_env(cluster, NP="2", HOSTFILE=str(hostfile), MASTER_PORT=str(port))
    log = log_dir / "mpirun.log"
    return [cluster.popen(1, [str(REPO / "launch" / "mpirun.sh"), str(recipe), *args], log, cwd=REPO, env=env)], [log]


LAUNCHERS = {"torchrun": start_torchrun, "deepspeed": start_deepspeed, "mpirun": start_mpirun}
PORTS = {"torchrun": 29400, "deepspeed": 29410, "mpirun": 29420}  # + ZeRO stage; + 9 for the node-kill run
STAGES = (2, 3)

SLURM_ALLOCATION = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


def submit(cluster, recipe: Path, log: Path, *args: str) -> int:
    return cluster.sbatch(
        *SLURM_ALLOCATION, f"--output={log}", str(SBATCH), str(recipe), *args, cwd=log.parent, env=node_env(cluster)
    )


@pytest.fixture(scope="module")
def stage_pairs(cluster, tmp_path_factory):
    """A launcher's ZeRO-2 and ZeRO-3 runs start together (the two share the cluster; on a small machine much of
    a run is waiting for processes to start, connect and exit). `pairs(launcher)` starts both on first use and
    returns {stage: (processes, logs, run dir)}; for "sbatch" the processes are job ids, and "preempt" is the
    preemption test's job."""
    started: dict[str, dict] = {}

    def pairs(launcher: str) -> dict:
        if launcher not in started:
            started[launcher] = {}
            if launcher == "sbatch":  # the preemption test's job too: Slurm runs the three side by side
                d = tmp_path_factory.mktemp("sbatch-preempted")
                recipe, run_dir = recipe_for(d, **PREEMPT_RUN)
                started[launcher]["preempt"] = ([submit(cluster, recipe, d / "job.out")], [d / "job.out"], run_dir)
            for stage in STAGES:
                d = tmp_path_factory.mktemp(f"{launcher}-zero{stage}")
                recipe, run_dir = recipe_for(d, deepspeed__zero_stage=stage)
                if launcher == "sbatch":
                    log = d / "job.out"
                    started[launcher][stage] = ([submit(cluster, recipe, log)], [log], run_dir)
                else:
                    procs, logs = LAUNCHERS[launcher](cluster, recipe, d, PORTS[launcher] + stage, "--resume", "none")
                    started[launcher][stage] = (procs, logs, run_dir)
        return started[launcher]

    yield pairs
    for launcher, runs in started.items():
        for procs, _, _ in runs.values():
            for proc in procs:
                if launcher == "sbatch":
                    cluster.scancel(str(proc))
                else:
                    _killpg(proc)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_across_two_nodes_matches_one_process(reference, cluster, stage_pairs, launcher, stage):
    procs, logs, run_dir = stage_pairs(launcher)[stage]
    finish(procs, logs)
    assert_matches(run_dir, reference())


# -- Slurm: sbatch --nodes=2 ----------------------------------------------------------------------


def logged_step(run_dir: Path, at_least: int = 1) -> bool:
    """Whether metrics.jsonl holds a complete line with step >= at_least (rank 0 is writing it as we look)."""
    path = run_dir / "metrics.jsonl"
    lines = (path.read_text() if path.exists() else "").split("\n")[:-1]
    return any('"loss"' in line and int(re.search(r'"step": (\d+)', line).group(1)) >= at_least for line in lines)


def test_sbatch_two_nodes_preempted_requeues_and_resumes(reference, cluster, stage_pairs):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): both ranks checkpoint, the job requeues and
    resumes on both nodes from that checkpoint; the losses are those of an uninterrupted run. (Before the
    completion tests: its job starts with theirs and must be signalled while it trains.)"""
    (job,), (log,), run_dir = stage_pairs("sbatch")["preempt"]
    deadline = time.monotonic() + 240
    while not logged_step(run_dir):
        assert time.monotonic() < deadline, f"no training step logged\n{log.read_text()[-3000:]}"
        assert cluster.job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.2)
    cluster.scancel("--batch", "--signal=USR1", str(job))
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
    assert 1 <= stopped_at < PREEMPT_RUN["train__max_steps"]
    assert_matches(run_dir, reference(**PREEMPT_RUN))


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_two_nodes_to_completion(reference, cluster, stage_pairs, stage):
    (job,), (log,), run_dir = stage_pairs("sbatch")[stage]
    state = cluster.wait_job(job, timeout=300)
    output = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{cluster.logs()}"
    assert f"2 node(s), 2 ranks, master {cluster.hosts[1]}" in output
    assert_matches(run_dir, reference())


# -- a node dies: every process on node 2 SIGKILLed mid-run -----------------------------------------
# One node death ends a job of each launcher at once (as a real node running several jobs would). The first runs
# are long (they never reach max_steps before the kill, however far apart they start); each resumes on node 1
# alone from its last checkpoint for RESUME_STEPS more steps (max_steps may change on resume), and every logged
# step is compared with one long one-process run (a constant learning rate after warm-up: a step's loss does not
# depend on max_steps).

KILL_RUN = dict(
    train__max_steps=100_000,
    schedule__decay="constant",
    checkpoint__every_steps=SAVE_EVERY,
    checkpoint__save_final=False,
    faults__heartbeat_timeout_s=KILL_TIMEOUT_S,
    deepspeed__zero_stage=2,  # 2 ranks -> 1: the elastic resume (llm/train/elastic.py)
)
RESUME_STEPS = 4
KILLED = [*LAUNCHERS, "sbatch"]


def kill_reference(steps: int) -> dict:
    """The node-kill recipe for `steps` steps, without its checkpoints (saving does not change the losses)."""
    return {**KILL_RUN, "train__max_steps": steps, "checkpoint__every_steps": 0}


def rank_hosts(run_dir: Path) -> dict[int, str]:
    beats = {int(p.name.split("_")[1]): p.read_text().split() for p in (run_dir / "heartbeat").glob("rank_?")}
    return {r: words[-1] for r, words in beats.items() if words}


def last_checkpoint(run_dir: Path) -> int:
    from llm.train.checkpoint import complete_steps, step_number

    steps = complete_steps(run_dir / "checkpoints")
    return step_number(steps[-1]) if steps else 0


class KilledJob:
    """One launcher's job in the node-kill run: how it ended, and its resume on node 1."""

    def __init__(self, cluster, launcher: str, d: Path):
        self.cluster, self.launcher, self.dir = cluster, launcher, d
        self.recipe, self.run_dir = recipe_for(d, **KILL_RUN)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.job: int | None = None
        self.ended_after: float | None = None  # seconds from the node's death to the job's end
        self.victim: int | None = None  # the rank that ran on node 2
        self.saved = 0
        self.resume_proc: subprocess.Popen | None = None
        self.resume_job: int | None = None

    def start(self) -> None:
        if self.launcher == "sbatch":
            self.logs = [self.dir / "job.out"]
            self.job = submit(self.cluster, self.recipe, self.logs[0])
        else:
            port = PORTS[self.launcher] + 9
            self.procs, self.logs = LAUNCHERS[self.launcher](
                self.cluster, self.recipe, self.dir, port, "--resume", "none"
            )

    def ended(self) -> bool:
        if self.job is None:  # the launcher on node 1 has exited (node 2's died with the node)
            return self.procs[0].poll() is not None
        # the job left RUNNING: failed, or requeued (--requeue) once Slurm saw the node fail
        state, restarts = self.cluster.job_field(self.job, "JobState"), self.cluster.job_field(self.job, "Restarts")
        return state not in ("PENDING", "RUNNING", "CONFIGURING") or restarts not in ("0", "UNKNOWN")

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.exists())

    def stop(self) -> None:
        for proc in self.procs:
            _killpg(proc)
        if self.job is not None:  # requeued, it would wait for node 2; this run resumes on node 1 instead
            self.cluster.scancel(str(self.job))

    def resume(self) -> None:
        """On node 1 alone, with the same global batch (1 rank x micro batch 4), from the last checkpoint."""
        self.saved = last_checkpoint(self.run_dir)
        sets = ["--set", "train.micro_batch_size=4", "--set", f"train.max_steps={self.saved + RESUME_STEPS}"]
        if self.job is None:
            cmd = [PYTHON, "-m", "llm", "pretrain", str(self.recipe), *sets, "--resume", "auto"]
            self.resume_proc = self.cluster.popen(1, cmd, self.dir / "resume.out", cwd=REPO, env=node_env(self.cluster))
        else:
            one = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", f"--nodelist={self.cluster.hosts[1]}"]
            self.resume_job = self.cluster.sbatch(
                *one,
                f"--output={self.dir / 'resume.out'}",
                str(SBATCH),
                str(self.recipe),
                *sets,
                cwd=self.dir,
                env=node_env(self.cluster),
            )

    def resumed(self) -> str:
        """Wait for the resume; '' when it succeeded, else what went wrong."""
        log = self.dir / "resume.out"
        if self.resume_proc is not None:
            try:
                code = self.resume_proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                _killpg(self.resume_proc)
                code = "timeout"
            return "" if code == 0 else f"resume exited {code}\n{log.read_text()[-3000:]}"
        state = self.cluster.wait_job(self.resume_job, timeout=300)
        return "" if state == "COMPLETED" else f"{state}\n{log.read_text()[-3000:]}\n{self.cluster.logs()}"


@pytest.fixture(scope="module")
def node_death(reference, cluster, tmp_path_factory):
    """Each launcher's job trains on both nodes; once every one is past its first checkpoint, every process of
    node 2 is SIGKILLed. Records when each job ended, then resumes each on node 1."""
    jobs = {name: KilledJob(cluster, name, tmp_path_factory.mktemp(f"kill-{name}")) for name in KILLED}
    try:
        for job in jobs.values():
            job.start()
        deadline = time.monotonic() + 300
        while not all(logged_step(job.run_dir, SAVE_EVERY + 2) for job in jobs.values()):
            for job in jobs.values():
                assert time.monotonic() < deadline and not job.ended(), (
                    f"{job.launcher}: training did not start\n{job.output()[-3000:]}"
                )
            time.sleep(0.2)
        for job in jobs.values():
            job.victim = next(r for r, h in rank_hosts(job.run_dir).items() if h == cluster.hosts[2])
        cluster.kill_node(2)
        killed = time.monotonic()
        while time.monotonic() - killed < 60 and any(job.ended_after is None for job in jobs.values()):
            for job in jobs.values():
                if job.ended_after is None and job.ended():
                    job.ended_after = time.monotonic() - killed
            time.sleep(0.2)
        for job in jobs.values():
            job.stop()
        ref_steps = max(max(read_losses(job.run_dir)) for job in jobs.values())
        for job in jobs.values():
            job.resume()
            ref_steps = max(ref_steps, job.saved + RESUME_STEPS)
        reference.start(**kill_reference(ref_steps))
        yield jobs, ref_steps
    finally:
        for job in jobs.values():
            job.stop()
            if job.resume_proc is not None:
                _killpg(job.resume_proc)
            if job.resume_job is not None:
                cluster.scancel(str(job.resume_job))


@pytest.mark.parametrize("launcher", KILLED)
def test_node_killed_ends_the_job_naming_it_and_the_run_resumes_on_one_node(node_death, reference, launcher):
    jobs, ref_steps = node_death
    job = jobs[launcher]
    output = job.output()
    assert job.ended_after is not None, f"job still running 60 s after node 2 died\n{output[-3000:]}"
    found = re.search(rf"rank {job.victim} \(pid \d+ on llm-n2\)", output)
    named = found.group(0) if found else f"rank {job.victim} (pid ... on llm-n2)"
    if named not in output and launcher == "mpirun":
        # mpirun notices its daemon on llm-n2 gone and kills the ranks itself, naming the node, before a rank can
        found = re.search(r"(Remote host:\s+|Remote daemon: .* on node )llm-n2\b", output)
        named = found.group(0) if found else named
    assert named in output, output[-4000:]
    print(f"node-kill ({launcher}): job ended {job.ended_after:.1f} s after node 2 died: {named}")

    before = read_losses(job.run_dir)
    assert job.saved >= SAVE_EVERY and max(before) >= job.saved
    failure = job.resumed()
    assert not failure, failure
    ref = reference(**kill_reference(ref_steps))
    got = read_losses(job.run_dir)  # steps after the last checkpoint are logged again by the resumed run
    assert max(got) >= job.saved + RESUME_STEPS
    assert "converting to DeepSpeed's universal format" in (job.dir / "resume.out").read_text()
    for step in got:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < 1e-4, (step, got[step], ref[step])
