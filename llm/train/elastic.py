"""Resuming a ZeRO 1-3 checkpoint on another number of ranks.

ZeRO shards the optimizer state (and under ZeRO-3 the weights) by rank, so a
checkpoint of N ranks cannot be read by M != N directly. DeepSpeed's universal
checkpoint format stores each parameter's fp32 weight and Adam moments whole;
`deepspeed.checkpoint.ds_to_universal` converts to it and the engine reads it
for any world size (`checkpoint.load_universal`). Rank 0 converts once into
`<step>/universal/` (kept beside the step, reused by later resumes), the others
wait; the optimizer state carries over, so the run continues as it would have.
The data position is global (samples consumed), so every rank continues at the
same place in the epoch's order; the recipe must keep the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from llm.log import logger
from llm.train.safe_load import safe_loads

UNIVERSAL = "universal"


def universal_copy(step_dir: Path, rank: int) -> Path:
    """`step_dir`'s universal form (converted by rank 0 on first use; every rank returns its path)."""
    import torch.distributed as dist

    out = Path(step_dir) / UNIVERSAL
    if rank == 0 and not (out / "DONE").is_file():
        from deepspeed.checkpoint.ds_to_universal import main as convert

        tmp = Path(step_dir) / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info(f"{step_dir} was saved by another number of ranks: converting to DeepSpeed's universal format")
        args = argparse.Namespace(
            input_folder=str(step_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with safe_loads(), contextlib.redirect_stdout(io.StringIO()):
            convert(args)
        (tmp / "DONE").write_text("ok\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_kwargs(engine) -> dict:
    """Switch the engine to reading the universal format for this load."""
    engine._config.load_universal_checkpoint = True
    return {}


def after_load(engine, state: dict) -> None:
    """Back to DeepSpeed's own format for the saves that follow."""
    engine._config.load_universal_checkpoint = False
