"""Resuming a ZeRO 1-3 checkpoint on another number of ranks.

ZeRO shards the optimizer state (and under ZeRO-3 the weights) by rank, so a
checkpoint of N ranks cannot be read by M != N directly. DeepSpeed's universal
checkpoint format stores each parameter's fp32 weight and Adam moments whole;
`deepspeed.checkpoint.ds_to_universal` converts to it and the engine reads it
for any world size (`checkpoint.load_universal`). Rank 0 converts once into
`<step>/universal/` (kept beside the step, reused by later resumes), the others
wait; the optimizer state carries over, so the run continues as it would have
(under ZeRO-3 after `restore_zero3_optimizer` puts right what DeepSpeed's load
gets wrong). The data position is global (samples consumed), so every rank
continues at the same place in the epoch's order; the recipe must keep the
global batch, split into ranks x micro-batch x grad_accum as it may.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

import torch

from llm.log import logger
from llm.train.safe_load import CheckpointError, safe_loads
from llm.train.safe_load import load as safe_load

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


def after_load(engine, load_dir: Path) -> None:
    """Back to DeepSpeed's own format for the saves that follow; under ZeRO-3, the optimizer state
    that DeepSpeed's universal load gets wrong put right (`restore_zero3_optimizer`)."""
    engine._config.load_universal_checkpoint = False
    if engine.zero_optimization_stage() == 3:
        restore_zero3_optimizer(engine.optimizer.optimizer, Path(load_dir))


def restore_zero3_optimizer(optimizer, load_dir: Path) -> None:
    """Work around two faults of DeepSpeed 0.19's ZeRO-3 universal load, which make a resumed run
    drift from the uninterrupted one from its first optimizer step (a 2-rank run resumed on 1:
    rel 5.7e-5 in loss one step after resume, 1.6e-3 after twelve):
    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3` in
    deepspeed/runtime/zero/stage3.py
    - gives every param group the settings of the first saved one (`optim_sd[...]["param_groups"][0]`,
      line 3687), so the no-decay group (norms, biases, embeddings) gets the matrices' weight decay;
      here each group takes its own saved settings, paired by index as ZeRO-1/2 does
      (`ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir`, runtime/base_optimizer.py);
    - puts one `step` tensor into the Adam state of every sub-group (line 3681); torch's Adam
      increments it in place once per sub-group, so Adam's bias correction runs ahead. Each
      sub-group gets its own copy here.
    `optimizer`: the torch optimizer inside ZeRO-3's; `load_dir`: the universal checkpoint it loaded.
    Raises CheckpointError when the checkpoint's param groups do not pair with the optimizer's."""
    path = load_dir / "zero" / "optimizer_state.pt"
    saved = safe_load(path, map_location="cpu", mmap=True)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: {len(saved)} optimizer param groups, the run's optimizer has {len(optimizer.param_groups)}"
        )
    for group, theirs in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in theirs.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
