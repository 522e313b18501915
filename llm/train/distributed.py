"""Find out who we are (torchrun, the deepspeed launcher, MPI, or a lone process), start
the process group, and watch the other ranks so a dead one ends the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.config import positive
from llm.errors import UserError
from llm.log import dependency_output, logger

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
# DeepSpeed JIT-builds its CPU allreduce op on first use (1-4 minutes on 2 cores); a lock older than this
# was left by a build that was killed, and torch's build lock waits for it forever.
STALE_BUILD_LOCK_S = 900.0


@dataclass
class FaultConfig:
    """The `faults:` section: how long a silent rank (`Heartbeat`) or a collective may take before
    the job ends instead of hanging."""

    heartbeat_timeout_s: float = 30.0  # a rank silent this long is declared dead
    collective_timeout_s: float = 120.0  # torch.distributed timeout

    def validate(self, path: str = "faults") -> None:
        positive(self, path, "heartbeat_timeout_s", "collective_timeout_s")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_name() -> str:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    if any(v in env for v in MPI_VARS):
        return "mpi"
    return "single"


def init_distributed(timeout_s: float = 120.0) -> DistInfo:
    """Start (or join) the default process group: gloo on CPU, nccl on CUDA."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    launcher = launcher_name()
    if launcher == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if cuda else "gloo"
    if not cuda:
        check_build_lock("deepspeed_shm_comm")
    if not dist.is_initialized():
        with dependency_output("deepspeed.init_distributed"):  # it prints that its CPU op loaded
            deepspeed.init_distributed(
                dist_backend=backend,
                auto_mpi_discovery=launcher == "mpi",
                # MPI discovery sets MASTER_PORT to this (DeepSpeed's default 29500 otherwise, whatever the
                # environment says): two mpirun jobs whose rank 0 shares a host would meet on one port
                distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
                timeout=datetime.timedelta(seconds=timeout_s),
                verbose=False,
            )
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        _release_shm_buffer(rank, world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, backend, launcher)


def check_build_lock(op: str, stale_after_s: float = STALE_BUILD_LOCK_S) -> None:
    """Refuse to wait on the JIT build lock of `op` (a torch cpp extension) that a killed build left.

    torch.utils.cpp_extension takes `<build dir>/lock` while it builds and waits, silently and
    without end, while another holds it; a process killed mid-build never removes it, so every later
    start hung. A young lock is someone building now: say so and wait. Raises UserError naming the
    lock file when it is older than `stale_after_s` seconds."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(op, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > stale_after_s:
        raise UserError(
            f"{lock}: a build lock {age / 60:.0f} minutes old, left by a killed build of {op} "
            "(a build takes a few minutes); delete it and start again"
        )
    logger.info(f"waiting for another process to finish building {op} (lock {lock}, {age:.0f} s old)")


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU allreduce keeps this rank's shared buffer (ops/csrc/cpu/comm/shm.cpp names it after
    the user id, MASTER_ADDR, MASTER_PORT and rank; 64 MiB of RAM in /dev/shm)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_buffer(rank: int, world: int) -> None:
    """DeepSpeed maps every local rank's buffer by name when all ranks share a host (LOCAL_SIZE == world size)
    and never unlinks the names: each run left 64 MiB per rank in /dev/shm. Once every rank has mapped every
    buffer (the barrier), the names are not needed; the memory goes when the last process exits, killed or not."""
    from deepspeed.comm import comm as ds_comm

    if getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(
        world
    ):
        return  # DeepSpeed's own condition for creating the buffers (shm_interface.cpp), the same on every rank
    if world > 1:
        torch.distributed.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


@contextlib.contextmanager
def distributed(timeout_s: float = 120.0):
    """`init_distributed` for the length of a run: the environment variables it sets for a lone
    process are restored afterwards (the process group stays, as DeepSpeed expects)."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    try:
        yield init_distributed(timeout_s)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


JOB_LOCK = "job.lock"


def _taken(run_dir: str | Path, holder: str) -> UserError:
    return UserError(
        f"run_dir {run_dir}: another job runs in it ({holder}, {JOB_LOCK}); wait for it to end, or use another run_dir"
    )


def refuse_taken_run_dir(run_dir: str | Path) -> None:
    """Fail in milliseconds, before any process group, when another job runs in `run_dir` (every rank may
    call: it only looks). Raises UserError naming that job's rank 0 (pid, host, since when)."""
    from llm.fileio import holder_of

    holder = holder_of(Path(run_dir) / JOB_LOCK)
    if holder is not None:
        raise _taken(run_dir, holder)


@contextlib.contextmanager
def owns_run_dir(run_dir: str | Path, dist: DistInfo):
    """The run directory belongs to this job for the block: rank 0 holds RUN_DIR/job.lock (see
    `llm.fileio.held`: released by the kernel however the job ends), every rank of the job writes
    as before, and when another job holds it every rank raises the same UserError naming it (pid,
    host, since when). All ranks call."""
    import torch.distributed as tdist

    from llm.fileio import Held, held

    since = datetime.datetime.now().isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        holder = ""
        if dist.rank == 0:
            try:
                stack.enter_context(
                    held(Path(run_dir) / JOB_LOCK, f"pid {os.getpid()} on {socket.gethostname()} since {since}")
                )
            except Held as e:
                holder = e.holder
        if dist.world_size > 1:  # rank 0's answer, as bytes (no pickle)
            message = torch.zeros(1024, dtype=torch.uint8, device=dist.device)
            data = holder.encode()[:1024]
            message[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
            tdist.broadcast(message, 0)
            holder = bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
        if holder:
            raise _taken(run_dir, holder)
        yield


def _process_state(pid: int) -> str | None:
    """The state letter of a process on this host (R, S, T stopped, Z zombie...), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


class RankFailure(UserError):
    """Another rank died or froze; the message names it (rank, host, pid, what was seen)."""


class Heartbeat:
    """Each rank writes "time pid host" to run_dir/heartbeat/rank_N every few seconds and checks the others'.

    A rank is declared lost, and every surviving rank logs which one (rank, host, pid) and
    exits with status 1, when:
    - it runs on this host and its process is gone or a zombie (killed, crashed): within one
      interval (<= 0.5 s), whatever launched it (torchrun, the deepspeed launcher, mpirun, SLURM,
      or by hand);
    - its file stops changing for `timeout_s` (frozen, its node gone; across nodes when the run
      directory is on a shared filesystem). A SIGSTOPped rank's heartbeat thread is stopped too.
    `diagnose()` names the lost rank when a collective fails or times out first.
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float):
        self.dir = Path(run_dir) / "heartbeat"
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = max(0.2, min(0.5, timeout_s / 5))
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def _path(self, rank: int) -> Path:
        return self.dir / f"rank_{rank}"

    def start(self) -> Heartbeat:
        if self.world_size == 1:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="llm-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        tmp = self._path(self.rank).with_suffix(".tmp")
        tmp.write_text(f"{time.time()} {os.getpid()} {self.host}\n")
        os.replace(tmp, self._path(self.rank))

    def peer(self, rank: int) -> tuple[str, float, int | None, str | None]:
        """(status "done" / "beating", last beat time, pid, host) from a rank's file."""
        try:
            fields = self._path(rank).read_text().split()
        except OSError:
            fields = []
        if fields[:1] == ["done"]:
            return "done", time.time(), None, None
        try:
            last = float(fields[0])
        except (IndexError, ValueError):
            last = 0.0
        pid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
        host = fields[2] if len(fields) > 2 else None
        if last < self._started - 2 * self.interval:  # a file of an earlier (killed) run: its pid is not a peer
            pid = host = None
        return "beating", max(last, self._started), pid, host  # files of an earlier run count from our start

    def describe(self, rank: int) -> str:
        _, _, pid, host = self.peer(rank)
        where = f" on {host}" if host else ""
        return f"rank {rank} (pid {pid}{where})" if pid else f"rank {rank}"

    def dead_rank(self, now: float | None = None) -> tuple[int, float] | None:
        """(rank, seconds silent) of a rank silent past the timeout, else None."""
        now = now or time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            status, last, _, _ = self.peer(r)
            if status != "done" and now - last > self.timeout_s:
                return r, now - last
        return None

    def gone_rank(self) -> tuple[int, str] | None:
        """(rank, what) of a rank on this host whose process has exited, or is stopped and silent."""
        now = time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            status, last, pid, host = self.peer(r)
            if status == "done" or pid is None or host != self.host:
                continue
            state = _process_state(pid)
            if state is None or state in "ZX":
                return r, "its process has exited"
            if state in "Tt" and now - last > 3 * self.interval:
                return r, f"its process is stopped (SIGSTOP?), silent for {now - last:.0f} s"
        return None

    def diagnose(self) -> str:
        """Which rank is lost, as far as the heartbeats tell (for a failed or timed-out collective)."""
        if self.world_size == 1:
            return ""
        # a killed peer's sockets close before its process is reaped: give the evidence a moment
        deadline = time.time() + max(2.0, 4 * self.interval)
        gone = self.gone_rank()
        while gone is None and time.time() < deadline:
            time.sleep(0.1)
            gone = self.gone_rank()
        if gone is not None:
            return f"{self.describe(gone[0])} is lost: {gone[1]}"
        # a peer on another node: its connection dropped before its heartbeat file goes stale, so
        # wait (at most the heartbeat timeout) for one to fall silent, unless every peer finished
        deadline = time.time() + self.timeout_s + 2 * self.interval
        while True:
            now = time.time()
            peers = [(now - self.peer(r)[1], r) for r in range(self.world_size) if r != self.rank]
            live = [(age, r) for age, r in peers if self.peer(r)[0] != "done"]
            silent = [(age, r) for age, r in live if age > 3 * self.interval]
            if silent:
                age, r = max(silent)
                return f"{self.describe(r)} is lost: no heartbeat for {age:.0f} s"
            if not live or now > deadline:
                return "no rank's heartbeat stopped (a network fault?)"
            time.sleep(self.interval)

    def _lost(self, what: str) -> None:
        logger.error(f"{what}; rank {self.rank} on {self.host} ends the job")
        for handler in logger.handlers:
            handler.flush()
        os._exit(1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError:
                pass
            gone = self.gone_rank()
            if gone is not None:
                self._lost(f"{self.describe(gone[0])} is lost: {gone[1]}")
            dead = self.dead_rank()
            if dead is not None:
                r, silent = dead
                self._lost(f"{self.describe(r)} stopped responding ({silent:.0f} s without a heartbeat)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.world_size > 1:
            self._path(self.rank).write_text(f"done {os.getpid()} {self.host}\n")
