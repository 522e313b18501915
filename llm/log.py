"""Logging for the library: one `llm` logger, rank-aware, and dependencies kept quiet.

Rank 0 logs at INFO by default; the other ranks stay quiet except for errors,
unless the level is DEBUG (`LLM_LOG_LEVEL=DEBUG`), where every rank logs with
its rank in front. Lines keep the `llm: ` prefix that the command's errors use,
so a job's log reads as one voice.

What a dependency says that means nothing for the run is llm's DEBUG, not the
user's terminal: the log records `CHATTER` names (from importing this module on),
deprecation warnings raised inside a dependency (from `setup_logging` on, as every
command starts), and what DeepSpeed prints while it starts (`dependency_output`).
Their warnings and errors about the run itself are left as they are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

logger = logging.getLogger("llm")

# (logger, text in the message) of records that say nothing about an llm run
CHATTER = (
    ("torchao", "Failed to load"),  # its CUDA and CUTLASS kernels, which a CPU-only torch cannot load
    ("torch.utils._pytree", "register_constant()"),  # a deprecation torchao's import triggers in torch
    # ZeRO-3's module hooks cannot see into ModelOutput (a dataclass); llm's ZeRO-3 runs match ZeRO-0's
    # (tests/train/test_zero.py), so the hook it means is not one llm needs
    ("DeepSpeed", "unknown inputs or outputs type"),
    # said by DeepSpeed where torch sees no CUDA device (its detection asks torch): on a CPU machine, always
    ("DeepSpeed", "Setting accelerator to CPU"),
)
# deprecations a dependency raises from its own code (the warning's module is not llm's)
DEPENDENCY = r"(?!llm(\.|$))"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class _Chatter(logging.Filter):
    """Passes a dependency's record unless `CHATTER` names it; those go to the llm logger at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(record.name == name and part in text for name, part in CHATTER):
            logger.debug(f"{record.name}: {text}")
            return False
        return True


_CHATTER = _Chatter()
for _name in {name for name, _ in CHATTER}:
    logging.getLogger(_name).addFilter(_CHATTER)


@contextlib.contextmanager
def dependency_output(what: str):
    """What a dependency prints to stdout or stderr inside the block (DeepSpeed's "... built
    successfully", zero_to_fp32's progress bars), logged at DEBUG under `what`; printed to stderr after
    all when the block raises. llm's own log lines are not caught: its handler holds the real stderr."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
    for line in buffer.getvalue().splitlines():
        logger.debug(f"{what}: {line}")


def short_list(names: list[str], shown: int = 8) -> str:
    """ "a, b, c and 5 more": the first `shown` names of a warning's list, and how many others."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class _Format(logging.Formatter):
    def __init__(self, rank: int, every_rank: bool):
        super().__init__()
        self.prefix = f"llm[rank {rank}]: " if every_rank else "llm: "

    def format(self, record: logging.LogRecord) -> str:
        kind = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.prefix}{kind}{record.getMessage()}"


def setup_logging(rank: int = 0, level: str | None = None) -> None:
    """Send `llm` records to stderr for this process's `rank` (call again when the rank is known)."""
    name = (level or os.environ.get("LLM_LOG_LEVEL", "INFO")).upper()
    numeric = getattr(logging, name, None)
    if not isinstance(numeric, int):
        raise ValueError(f"LLM_LOG_LEVEL: {name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    every_rank = numeric <= logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(rank, every_rank))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(numeric if rank == 0 or every_rank else logging.ERROR)
    if not every_rank:
        for category in DEPRECATIONS:
            warnings.filterwarnings("ignore", category=category, module=DEPENDENCY)
