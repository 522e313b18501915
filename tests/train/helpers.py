"""Run `llm pretrain` in subprocesses (one rank, or 2 ranks through torchrun) and read their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))

# A model and synthetic data small enough for a handful of steps in a few seconds on one core.
TINY = {
    "model": {
        "base": "gpt2-tiny",
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 2,
        "d_ff": 128,
        "vocab_size": 256,
        "max_seq_len": 64,
    },
    "data": {"source": "synthetic", "seq_len": 16},
    "train": {"micro_batch_size": 4, "max_steps": 5, "log_every": 1},
    "optim": {"lr": 3.0e-3},
    "schedule": {"warmup_steps": 2},
    "logging": {"tensorboard": False},
}


def assembled_trainer(recipe, resume: str = "none"):
    """The Trainer that `llm pretrain` would run for `recipe`, built in this process."""
    from llm.run.train import assemble
    from llm.train.distributed import init_distributed

    return assemble(recipe, init_distributed(recipe.faults.collective_timeout_s), resume).trainer


def env() -> dict:
    # in-process trainers of other tests set these; a child must discover its own world
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return e


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def command(recipe: Path, ranks: int, *overrides: str, resume: str = "auto") -> list[str]:
    sets = [x for o in overrides for x in ("--set", o)]
    if ranks == 1:
        head = [PYTHON, "-m", "llm"]
    else:
        head = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "llm"]
    return [*head, "pretrain", str(recipe), *sets, "--resume", resume]


def run(recipe: Path, ranks: int, *overrides: str, resume: str = "auto", timeout: float = 180) -> str:
    proc = subprocess.run(
        command(recipe, ranks, *overrides, resume=resume),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (before a kill and after resuming) keeps its last value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for_first_checkpoint(ckpt_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `ckpt_dir/latest` exists; AssertionError when `proc` ends first or `timeout` passes."""
    from llm.train.checkpoint import LATEST

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with status {proc.returncode}")
        if (Path(ckpt_dir) / LATEST).is_file():
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint in {timeout} s")
