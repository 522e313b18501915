"""Atomic checkpoints: a step directory per save, `latest` moved only when every rank is done.

Layout of `RUN_DIR/checkpoints/`:

    step_00000100/            DeepSpeed's engine state (model, optimizer shards, scheduler)
      recipe.yaml             the resolved recipe
      model.yaml              the model's description: config, task, transforms (rebuilds the model)
      trainer_rank_N.pt       step, data position, RNG states (python, numpy, torch) of rank N
      COMPLETE                written by rank 0 after a barrier: every rank finished writing
    latest                    the name of the newest complete step directory (atomic replace)

A step directory without COMPLETE (a job killed while saving) is ignored with a
warning; the last `keep_last` complete ones are kept.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from llm.errors import UserError
from llm.fileio import write_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_steps(ckpt_dir: Path) -> list[Path]:
    """Complete step directories, oldest first; incomplete ones draw a warning."""
    ckpt_dir = Path(ckpt_dir)
    done = []
    for d in sorted(ckpt_dir.glob("step_*")):
        if not d.is_dir():
            continue
        if (d / COMPLETE).is_file():
            done.append(d)
        else:
            warnings.warn(f"{d}: incomplete checkpoint (no {COMPLETE} marker), ignored", stacklevel=2)
    return done


def find_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The step directory to load: `path` itself when it is one, else `tag`, else `latest`."""
    path = Path(path)
    if (path / COMPLETE).is_file() and tag is None:
        return path
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint directory not found")
    if tag is not None:
        step = path / tag
        if not (step / COMPLETE).is_file():
            raise UserError(f"{step}: not a complete checkpoint (no {COMPLETE} marker)")
        return step
    latest = path / LATEST
    if latest.is_file():
        step = path / latest.read_text().strip()
        if (step / COMPLETE).is_file():
            return step
        warnings.warn(f"{latest} names {step.name}, which is incomplete; using the newest complete one", stacklevel=2)
    steps = complete_steps(path)
    if not steps:
        raise UserError(f"{path}: no complete checkpoint (step_* directory with a {COMPLETE} marker)")
    return steps[-1]


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, meta: dict, rank: int, keep_last: int) -> Path:
    """Every rank calls this; returns the step directory once it is complete and `latest`.

    `meta` maps file stems to what rank 0 writes as YAML beside the engine state: the
    resolved recipe ("recipe") and the model's description ("model": config, task,
    transforms), from which the model is rebuilt without the run."""
    import torch.distributed as dist

    tag = step_tag(step)
    out = Path(ckpt_dir) / tag
    if (out / COMPLETE).is_file():  # already saved (a resumed run that had nothing left to do)
        return out
    if rank == 0 and out.exists():  # a half-written save of the same step from a killed run
        shutil.rmtree(out)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    state = dict(trainer_state, step=step, rng=rng_state())
    torch.save(state, out / f"trainer_rank_{rank}.pt")
    if rank == 0:
        for stem, content in meta.items():
            write_atomic(out / f"{stem}.yaml", yaml.safe_dump(content, sort_keys=False))
    dist.barrier()  # every rank has written its part
    if rank == 0:
        write_atomic(out / COMPLETE, f"{step}\n")
        write_atomic(Path(ckpt_dir) / LATEST, f"{tag}\n")
        for old in complete_steps(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out


def load(engine, step_dir: Path, rank: int) -> dict:
    """Restore engine state and this rank's trainer state (step, data position, RNG)."""
    step_dir = Path(step_dir)
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if path is None:
        raise UserError(f"{step_dir}: DeepSpeed could not load this checkpoint")
    own = step_dir / f"trainer_rank_{rank}.pt"
    if not own.is_file():  # resuming on more ranks than saved: data position is global, RNG from rank 0
        own = step_dir / "trainer_rank_0.pt"
    state = torch.load(own, weights_only=False)
    set_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------
# Consolidation: a model with full fp32 weights from any ZeRO stage
# ----------------------------------------------------------------------------


def consolidated_state_dict(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, gathered from every rank's shards (ZeRO 1-3) or read whole (ZeRO 0)."""
    step_dir = find_checkpoint(path, tag)
    if list(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:
        files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{step_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}
