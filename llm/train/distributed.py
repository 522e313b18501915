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

from llm.log import logger

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


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
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=launcher == "mpi",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, backend, launcher)


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


class Heartbeat:
    """Each rank touches run_dir/heartbeat/rank_N every few seconds and checks the others'.

    A rank whose file stops changing for `timeout_s` (killed, frozen, its node gone)
    makes every surviving rank print which rank it lost, and on which host, and exit with
    status 1; the collectives they may be blocked in would otherwise wait forever. Works
    across nodes when the run directory is on a shared filesystem. A beat is one line,
    `<unix time> <hostname>`; a finished rank writes `done <hostname>`.
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float):
        self.dir = Path(run_dir) / "heartbeat"
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = max(0.2, min(2.0, timeout_s / 5))
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
        tmp.write_text(f"{time.time()} {socket.gethostname()}\n")
        os.replace(tmp, self._path(self.rank))

    def dead_rank(self, now: float | None = None) -> tuple[int, float] | None:
        """(rank, seconds silent) of a rank silent past the timeout, else None."""
        now = now or time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                text = self._path(r).read_text().strip()
            except OSError:
                text = ""
            if text.startswith("done"):
                continue
            try:
                last = float(text.split()[0])
            except (ValueError, IndexError):
                last = 0.0
            last = max(last, self._started)  # files from an earlier run count from our own start
            if now - last > self.timeout_s:
                return r, now - last
        return None

    def _finished(self, rank: int) -> bool:
        try:
            return self._path(rank).read_text().startswith("done")
        except OSError:
            return False

    def host_of(self, rank: int) -> str:
        """The host `rank` last beat from ("unknown host" before its first beat)."""
        try:
            return self._path(rank).read_text().split()[1]
        except (OSError, IndexError):
            return "unknown host"

    def name_lost_peer(self) -> tuple[int, str] | None:
        """After a collective failed: wait up to timeout_s (plus a beat) for a peer to fall silent and log
        which rank on which host it was, so a job ended by a peer's connection dropping still names the
        node that died. Returns (rank, host), or None when every peer keeps beating (not a lost peer)."""
        if self.world_size == 1:
            return None
        deadline = time.time() + self.timeout_s + 2 * self.interval
        while time.time() < deadline:
            if all(self._finished(r) for r in range(self.world_size) if r != self.rank):
                return None  # every peer ended on its own: the failure was not a lost peer
            dead = self.dead_rank()
            if dead is not None:
                r, silent = dead
                logger.error(
                    f"rank {r} on {self.host_of(r)} stopped responding ({silent:.0f} s without a heartbeat); "
                    f"rank {self.rank} on {socket.gethostname()} ends the job"
                )
                return r, self.host_of(r)
            time.sleep(self.interval)
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError:
                pass
            dead = self.dead_rank()
            if dead is not None:
                r, silent = dead
                logger.error(
                    f"rank {r} on {self.host_of(r)} stopped responding ({silent:.0f} s without a heartbeat); "
                    f"rank {self.rank} on {socket.gethostname()} ends the job"
                )
                for handler in logger.handlers:
                    handler.flush()
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.world_size > 1:
            self._path(self.rank).write_text(f"done {socket.gethostname()}\n")
