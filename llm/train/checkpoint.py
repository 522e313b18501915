"""Atomic, verified checkpoints: a step directory per save, `latest` moved only when every rank is done.

Layout of `RUN_DIR/checkpoints/`:

    step_00000100/            DeepSpeed's engine state (model, optimizer shards, scheduler)
      recipe.yaml             the resolved recipe
      model.yaml              the model's description: config, task, transforms (rebuilds the model)
      trainer_rank_N.pt       rank N's `Trainer.state_dict()` (step, data position, callbacks' states:
                              every callback's in rank 0's, per-rank ones' in each) and RNG states,
                              as plain tensors and numbers
      COMPLETE                the manifest: every file of the step with its size and sha256 (JSON),
                              written by rank 0 after every rank finished writing
    latest                    the name of the newest complete step directory (atomic replace)

A save is written aside, in `.partial-step_00000100/`, and renamed to its step name only
when every rank wrote its part without error, so a step directory is never partial: a
full disk or a killed job leaves the previous checkpoints and `latest` as they were (a
stale `.partial-*` is removed by the next save). `find_checkpoint` checks a step's files
against its manifest and falls back to the newest intact step, naming the broken file.
Every file is read through `llm.train.safe_load`: tensors and plain data only, no code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from llm.errors import UserError
from llm.fileio import contained, write_atomic
from llm.log import dependency_output, logger
from llm.train.safe_load import CheckpointError, safe_loads
from llm.train.safe_load import load as safe_load

COMPLETE = "COMPLETE"
LATEST = "latest"
PARTIAL = ".partial-"
MANIFEST_FORMAT = "llm-checkpoint"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_number(path: Path) -> int:
    try:
        return int(Path(path).name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_steps(ckpt_dir: Path) -> list[Path]:
    """Step directories with a COMPLETE manifest, oldest first (not yet verified)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    done = [d for d in ckpt_dir.glob("step_*") if d.is_dir() and (d / COMPLETE).is_file()]
    return sorted(done, key=step_number)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: Path, step: int) -> None:
    """COMPLETE: every file below `step_dir` with its byte size and sha256."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != COMPLETE):
        files[str(path.relative_to(step_dir))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    write_atomic(step_dir / COMPLETE, json.dumps(manifest, indent=1) + "\n")


def verify(step_dir: Path) -> None:
    """Check every file of a step against its manifest; CheckpointError naming the first that differs.

    A COMPLETE marker that is not a manifest (a checkpoint of an older llm) is accepted unverified."""
    step_dir = Path(step_dir)
    marker = step_dir / COMPLETE
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return
    files = manifest.get("files")
    entries = files.values() if isinstance(files, dict) else [None]
    if not all(isinstance(e, dict) and {"bytes", "sha256"} <= e.keys() for e in entries):
        raise CheckpointError(f"{marker}: files: expected a mapping of file names to their bytes and sha256")
    for name, entry in files.items():
        path = contained(step_dir, name)
        if path is None:
            raise CheckpointError(f"{marker}: {name!r} is not a file of this checkpoint (paths outside it are refused)")
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {marker} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the checkpoint's manifest says {entry['bytes']} (truncated?)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the checkpoint's manifest (damaged or altered)")


def find_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The step directory to load, verified: `path` itself when it is one, else `tag`, else the
    newest intact one (`latest` first; a step that fails verification is skipped with a warning
    naming its broken file). Raises UserError / CheckpointError when there is none."""
    path = Path(path)
    if (path / COMPLETE).is_file() and tag is None:
        verify(path)
        return path
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint directory not found")
    if tag is not None:
        step = path / tag
        if not (step / COMPLETE).is_file():
            raise UserError(f"{step}: not a complete checkpoint (no {COMPLETE} manifest)")
        verify(step)
        return step
    candidates = complete_steps(path)[::-1]
    latest = path / LATEST
    if latest.is_file():
        named = path / latest.read_bytes().decode(errors="replace").strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            logger.warning(f"{latest} names {named.name}, which is not a complete checkpoint; looking for others")
    if not candidates:
        raise UserError(f"{path}: no complete checkpoint (step_* directory with a {COMPLETE} manifest)")
    for step in candidates:
        try:
            verify(step)
            return step
        except CheckpointError as e:
            logger.warning(f"checkpoint {step.name} is damaged, not used: {e}")
    raise CheckpointError(f"{path}: every checkpoint is damaged ({', '.join(s.name for s in candidates)})")


# ----------------------------------------------------------------------------
# RNG state as tensors and numbers (readable with weights_only=True)
# ----------------------------------------------------------------------------


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------


class _Writes:
    """Within `capture()`, `torch.save` writes aside and renames; a failed write (full disk, quota)
    is recorded instead of raised, so every rank still reaches DeepSpeed's collectives and all
    of them can agree to drop the save."""

    def __init__(self):
        self.failures: list[str] = []

    @contextlib.contextmanager
    def capture(self):
        original = torch.save

        def save(obj, f, *args, **kwargs):
            if not isinstance(f, (str, os.PathLike)):
                return original(obj, f, *args, **kwargs)
            path = Path(f)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                original(obj, str(tmp), *args, **kwargs)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except (OSError, RuntimeError) as e:
                tmp.unlink(missing_ok=True)
                self.failures.append(f"{path}: {_short(e, path.parent)}")

        torch.save = save
        try:
            yield self
        finally:
            torch.save = original


def _short(e: BaseException, where: Path | None = None) -> str:
    """One line for a failed write; torch's zip writer says only "unexpected pos", so the free space is added."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "unexpected pos" in text or "enforce fail" in text or "file write failed" in text:
        free = ""
        if where is not None:
            with contextlib.suppress(OSError):
                free = f"; {shutil.disk_usage(where).free / 1e9:.2f} GB free there"
        text = f"the write stopped part-way: full disk, quota or file-size limit{free}"
    return text


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prune(ckpt_dir: Path, current: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete steps up to `current`; remove steps after it (a timeline
    this run left when it resumed from an earlier one) and stale partial saves."""
    now = step_number(current)
    for d in ckpt_dir.glob(f"{PARTIAL}*"):
        _remove(d)
    for d in ckpt_dir.glob("step_*"):
        if d.is_dir() and step_number(d) > now:
            logger.info(f"removing {d.name}: after {current.name}, from a timeline this run left")
            _remove(d)
    kept = [d for d in complete_steps(ckpt_dir) if step_number(d) <= now]
    for old in kept[:-keep_last]:
        _remove(old)
    for d in ckpt_dir.glob("step_*"):  # incomplete steps of killed older llm versions
        if d.is_dir() and not (d / COMPLETE).is_file():
            _remove(d)


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    trainer_state: dict,
    meta: dict,
    rank: int,
    keep_last: int,
    resumed_step: int | None = None,
) -> Path:
    """Every rank calls this; returns the step directory once it is complete and `latest` names it.

    `trainer_state` is this rank's `Trainer.state_dict()`, written with its RNG states as
    trainer_rank_N.pt. `meta` maps file stems to what rank 0 writes as YAML beside the engine
    state: the resolved recipe ("recipe") and the model's description ("model": config, task,
    transforms), from which the model is rebuilt without the run. The save is written
    aside and renamed (see the module docstring); when any rank fails to write its part,
    every rank raises CheckpointError naming the file and nothing of the save is kept.
    `resumed_step`: the step this run resumed from; its own complete directory is kept as it is."""
    ckpt_dir = Path(ckpt_dir)
    tag = step_tag(step)
    out = ckpt_dir / tag
    if step == resumed_step and (out / COMPLETE).is_file():  # a resumed run that had nothing left to do
        return out
    partial_tag = PARTIAL + tag
    partial = ckpt_dir / partial_tag
    if rank == 0:
        _remove(partial)
    _barrier()
    writes = _Writes()
    with writes.capture():
        try:
            engine.save_checkpoint(str(ckpt_dir), tag=partial_tag, save_latest=False)
        except (OSError, RuntimeError) as e:  # a write outside torch.save (DeepSpeed's own files)
            writes.failures.append(f"{partial}: {_short(e)}")
        if not writes.failures:
            torch.save(dict(trainer_state, rng=rng_state()), partial / f"trainer_rank_{rank}.pt")
    if rank == 0 and not writes.failures:
        try:
            for stem, content in meta.items():
                write_atomic(partial / f"{stem}.yaml", yaml.safe_dump(content, sort_keys=False))
        except OSError as e:
            writes.failures.append(f"{partial}: {_short(e)}")
    failed = _any_rank(bool(writes.failures))
    if not failed and rank == 0:
        try:
            write_manifest(partial, step)
        except OSError as e:
            writes.failures.append(f"{partial / COMPLETE}: {_short(e)}")
    failed = _any_rank(bool(writes.failures))
    if failed:
        if rank == 0:
            _remove(partial)
        _barrier()
        previous = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else "none"
        what = writes.failures[0] if writes.failures else "another rank could not write its part"
        raise CheckpointError(
            f"checkpoint {tag} not saved: {what}; nothing of it was kept, the latest checkpoint is still {previous}"
        )
    if rank == 0:
        if out.exists():  # a directory of the same step from an earlier timeline: replaced
            stale = ckpt_dir / f"{PARTIAL}old-{tag}"
            os.replace(out, stale)
        os.replace(partial, out)
        write_atomic(ckpt_dir / LATEST, f"{tag}\n")
        prune(ckpt_dir, out, keep_last)
    _barrier()
    return out


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def trainer_state(step_dir: Path, rank: int) -> dict:
    """This rank's trainer state (rank 0's when the checkpoint had fewer ranks), read safely."""
    own = Path(step_dir) / f"trainer_rank_{rank}.pt"
    if not own.is_file():  # resuming on more ranks than saved: data position is global, RNG from rank 0
        own = Path(step_dir) / "trainer_rank_0.pt"
    return safe_load(own, map_location="cpu")


def load(engine, step_dir: Path, rank: int, load_dir: Path | None = None, **kwargs) -> dict:
    """Restore engine state (from `load_dir`/step name when given: a converted copy) and this rank's
    RNG states; returns this rank's trainer state (`trainer_state`). Every file is read without code."""
    step_dir = Path(step_dir)
    source = Path(load_dir) if load_dir is not None else step_dir
    with safe_loads():
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, **kwargs)
    if path is None:
        raise CheckpointError(f"{source}: DeepSpeed could not load this checkpoint")
    state = trainer_state(step_dir, rank)
    set_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------
# Consolidation: a model with full fp32 weights from any ZeRO stage
# ----------------------------------------------------------------------------


def consolidated_state_dict(
    path: str | Path, tag: str | None = None, merge: Callable[[list[dict]], dict] | None = None
) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, gathered from every rank's shards (ZeRO 1-3) or read whole (ZeRO 0).

    A tensor-parallel checkpoint holds one model (mp_rank_NN_model_states.pt) and its ZeRO shards per tensor
    rank: each is consolidated on its own, and `merge` puts their states (rank order) together into the whole
    model's (it knows the model: `llm.run.loader.merge_tensor_parallel`); UserError when `merge` is None then."""
    step_dir = find_checkpoint(path, tag)
    ranks = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if len(ranks) <= 1:
        return _fp32_state(step_dir)
    if merge is None:
        raise UserError(f"{step_dir}: a tensor-parallel checkpoint ({len(ranks)} ranks) needs its model to be merged")
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, model_file in enumerate(ranks):  # a step directory of rank i's files alone, for zero_to_fp32
            view = Path(tmp) / f"tensor_rank_{i}" / step_dir.name
            view.mkdir(parents=True)
            for file in (model_file, *step_dir.glob(f"*_mp_rank_{i:02d}_optim_states.pt")):
                (view / file.name).symlink_to(file.resolve())
            parts.append(_fp32_state(view))
    return merge(parts)


def _fp32_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a step directory of one model-parallel rank (see `consolidated_state_dict`)."""
    with safe_loads():
        if list(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
            if not torch.cuda.is_available():  # as a run says (llm.train.distributed), so DeepSpeed need not guess
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with dependency_output("deepspeed zero_to_fp32"):  # it prints what it reads
                state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        else:
            files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise UserError(f"{step_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
            state = safe_load(files[0], map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}
