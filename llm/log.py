"""Logging for the library: one `llm` logger, rank-aware.

Rank 0 logs at INFO by default; the other ranks stay quiet except for errors,
unless the level is DEBUG (`LLM_LOG_LEVEL=DEBUG`), where every rank logs with
its rank in front. Lines keep the `llm: ` prefix that the command's errors use,
so a job's log reads as one voice.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("llm")


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
