"""Real Slurm for tests, as root: munged, slurmctld and slurmd with all their state in one directory.

Nothing touches /etc: the daemons and clients find the configuration through $SLURM_CONF, munged has its own
key and socket. `SlurmCluster` is a single node on this machine (ports picked free, so several can run at once);
the two-node cluster (tests/launch/testcluster.py) writes its configuration and runs its daemons and clients
with the same pieces here: `slurm_conf`, `munged_command`, `SlurmClient`, `wait_until`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def tool(name: str) -> str:
    """The tool's path (Debian puts the daemons in /usr/sbin, which a non-login PATH may lack)."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def missing_tools(tools=SLURM_TOOLS) -> list[str]:
    return [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
SlurmdParameters=config_overrides
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{nodes}
PartitionName={partition} Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
# cred_expire=10: a requeued job waits this long before it starts again (Debian's default is 120 s).
# config_overrides: a node offers the CPUs written here even where the machine has fewer (several small test
# jobs share its cores). SlurmdTimeout=30: a node whose slurmd is silent this long is DOWN and its jobs end (the
# default is 300 s).

CGROUP_CONF = "CgroupPlugin=autodetect\nIgnoreSystemd=yes\nConstrainCores=no\nConstrainRAMSpace=no\n"


def slurm_conf(
    dir: Path,
    nodes: dict[str, str],
    cpus: int,
    munge_socket: Path,
    ctld_port: int,
    slurmd_port: int,
    cluster: str = "llmtest",
    partition: str = "debug",
) -> Path:
    """Write slurm.conf and cgroup.conf into `dir` for `nodes` (name -> address, slurmctld on the first, `cpus`
    CPUs each) and create the state directory; returns slurm.conf's path (for $SLURM_CONF)."""
    (dir / "state").mkdir(parents=True, exist_ok=True)
    ctld_host, ctld_addr = next(iter(nodes.items()))
    conf = SLURM_CONF.format(
        cluster=cluster,
        ctld_host=ctld_host,
        ctld_addr=ctld_addr,
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        munge_socket=munge_socket,
        dir=dir,
        nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN" for n, a in nodes.items()),
        partition=partition,
        node_names=",".join(nodes),
    )
    (dir / "slurm.conf").write_text(conf)
    (dir / "cgroup.conf").write_text(CGROUP_CONF)
    return dir / "slurm.conf"


def munged_command(dir: Path) -> list[str]:
    """munged in the foreground with a fresh key, its socket and files in `dir` (socket: dir/munge.socket)."""
    dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dir, 0o700)
    key = dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    return [
        tool("munged"),
        "--foreground",
        "--force",
        f"--key-file={key}",
        f"--socket={dir / 'munge.socket'}",
        f"--pid-file={dir / 'munged.pid'}",
        f"--log-file={dir / 'munged.log'}",
        f"--seed-file={dir / 'munged.seed'}",
    ]


def slurm_env(conf: Path) -> dict[str, str]:
    """This environment with SLURM_CONF set and an outer Slurm job's variables removed (a job inherits the
    submitter's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    return env


def wait_until(ready, timeout: float, what: str, failed=lambda: None, logs=lambda: "") -> None:
    """Poll `ready()` every 0.3 s; raise when `failed()` returns a reason (a daemon died) or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        why = failed()
        if why:
            raise RuntimeError(f"{why} while waiting for {what}\n{logs()}")
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{logs()}")


class SlurmClient:
    """sbatch/scontrol/scancel against a test cluster; `client(cmd, ...)` runs a client command where the
    cluster's clients run (this machine, or a node), `slurm_dir` holds the logs."""

    slurm_dir: Path
    env: dict[str, str]

    def client(self, cmd: list[str], cwd=None, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.client([tool("scontrol"), *args], timeout=20)

    def sbatch(self, *args: str, cwd: str | Path, env: dict | None = None) -> int:
        out = self.client([tool("sbatch"), "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})})
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self.client([tool("scancel"), *args], timeout=20)

    def job_field(self, job_id: int, name: str) -> str:
        for field in self.scontrol("show", "job", str(job_id)).stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def node_state(self, node: str) -> str:
        for field in self.scontrol("show", "node", node).stdout.split():
            if field.startswith("State="):
                return field.split("=", 1)[1].split("+")[0]
        return "UNKNOWN"

    def wait_job(self, job_id: int, timeout: float) -> str:
        """Wait until the job leaves PENDING/RUNNING; return its final state (cancel it on timeout)."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "UNKNOWN"):
                return state
            time.sleep(0.3)
        self.scancel(str(job_id))
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in [self.slurm_dir / "slurmctld.log", *sorted(self.slurm_dir.glob("slurmd-*.log"))]:
            if path.exists():
                parts.append(f"--- {path.name} (tail)\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


class SlurmCluster(SlurmClient):
    """One node on this machine (its hostname, 127.0.0.1). Start with `start()`, always `stop()` (a context
    manager does both)."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = self.slurm_dir = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = slurm_env(self.root / "slurm.conf")

    def client(self, cmd, cwd=None, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or self.env, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        munge = self.root / "munge"
        slurm_conf(
            self.root,
            {self.host: "127.0.0.1"},
            self.cpus,
            munge / "munge.socket",
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
        )
        self._spawn("munged", munged_command(munge))
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [tool("slurmctld"), "-D", "-i"])
        self._wait(lambda: "UP" in self.scontrol("ping").stdout, timeout, "slurmctld")
        self._spawn("slurmd", [tool("slurmd"), "-D", "-N", self.host])
        self._wait(lambda: self.node_state(self.host) == "IDLE", timeout, "slurmd (node idle)")
        return self

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def signal_batch(self, job_id: int, signal_name: str) -> None:
        """Signal the job's batch shell, as `--signal=B:SIG@T` does near the time limit."""
        out = self.scancel("--batch", f"--signal={signal_name}", str(job_id))
        assert out.returncode == 0, out.stderr

    def restarts(self, job_id: int) -> int:
        value = self.job_field(job_id, "Restarts")
        return int(value) if value.isdigit() else 0

    def job_state(self, job_id: int) -> str:
        return self.job_field(job_id, "JobState")

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, ready, timeout: float, what: str) -> None:
        def failed():
            dead = [f"{n} exited with {p.returncode}" for n, p in self.procs.items() if p.poll() is not None]
            return ", ".join(dead)

        wait_until(ready, timeout, what, failed, self.logs)
