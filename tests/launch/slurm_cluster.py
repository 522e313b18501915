"""A real single-node Slurm for tests: munged, slurmctld and slurmd as root, all state in one tmp dir.

Nothing touches /etc: the daemons and clients find the config through $SLURM_CONF, munged has its own
key and socket, and the ports are picked free so several of these can run on one machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=llmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
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
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

CGROUP_CONF = "CgroupPlugin=autodetect\nIgnoreSystemd=yes\nConstrainCores=no\nConstrainRAMSpace=no\n"


class SlurmCluster:
    """Start with `start()`, always `stop()` (a context manager does both)."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        # A job inherits the submitter's environment: keep any outer Slurm job's variables out.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_")) and key != "SLURM_CONF":
                del self.env[key]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        (self.root / "slurm.conf").write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                cpus=self.cpus,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                munge_socket=self.munge_socket,
            )
        )
        (self.root / "cgroup.conf").write_text(CGROUP_CONF)
        self._spawn(
            "munged",
            [
                _tool("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'munge' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i"])
        self._wait(
            lambda: self._scontrol("ping").returncode == 0 and "UP" in self._scontrol("ping").stdout,
            timeout,
            "slurmctld",
        )
        self._spawn("slurmd", [_tool("slurmd"), "-D", "-N", self.host])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
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

    # -- clients -----------------------------------------------------------------------------

    def sbatch(self, *args: str, cwd: str | Path | None = None, env: dict | None = None) -> int:
        out = subprocess.run(
            [_tool("sbatch"), "--parsable", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**self.env, **(env or {})},
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        out = self._scontrol("show", "job", str(job_id))
        for field in out.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: int, timeout: float) -> str:
        """Wait until the job leaves PENDING/RUNNING; return its final state."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(1)
        self._scontrol("cancel", str(job_id))
        subprocess.run([_tool("scancel"), str(job_id)], env=self.env, capture_output=True)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.logs()}")

    def signal_batch(self, job_id: int, signal_name: str) -> None:
        """Signal the job's batch shell, as `--signal=B:SIG@T` does near the time limit."""
        subprocess.run(
            [_tool("scancel"), "--batch", f"--signal={signal_name}", str(job_id)],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=20,
        )

    def restarts(self, job_id: int) -> int:
        for field in self._scontrol("show", "job", str(job_id)).stdout.split():
            if field.startswith("Restarts="):
                return int(field.split("=", 1)[1])
        return 0

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("scontrol"), *args], capture_output=True, text=True, env=self.env, timeout=20)

    def _node_idle(self) -> bool:
        out = self._scontrol("show", "node", self.host).stdout
        return "State=IDLE" in out

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{self.logs()}")
