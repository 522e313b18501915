"""Shared by the launch tests: a tiny recipe and the environment a launched rank needs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.train.helpers import TINY

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# train's tiny GPT on synthetic batches (tests/train/helpers.py), without the final export: a run
# measures the launcher, not the model.
TINY_RECIPE = {
    **TINY,
    "train": {**TINY["train"], "max_steps": 3},
    "checkpoint": {"save_final": False},
    "logging": {"tensorboard": False, "progress": False},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write the tiny recipe with its run directory under tmp_path; return (recipe path, run dir)."""

    def make(**train) -> tuple[Path, Path]:
        recipe = {**TINY_RECIPE, "run_dir": str(tmp_path / "run"), "train": {**TINY_RECIPE["train"], **train}}
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path, tmp_path / "run"

    return make


def launch_env(**extra: str) -> dict[str, str]:
    """This interpreter's venv first on PATH, the checkout importable, CPU DeepSpeed with one thread per rank."""
    env = dict(os.environ)
    for key in list(env):  # a launcher must not mistake the test process for a rank of an outer job
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or key.startswith(
            ("OMPI_", "PMIX_", "SLURM_")
        ):
            del env[key]
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
        PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", "/work/.cache/torch_extensions")
        if Path("/work/.cache").is_dir()
        else env.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
    )
    env.update(extra)
    return env


def read_losses(run_dir: Path) -> dict[int, float]:
    from llm.run.plot import load_metrics

    return {r["step"]: r["loss"] for r in load_metrics(run_dir) if "loss" in r}


def ranks_that_ran(run_dir: Path) -> set[int]:
    """Every rank touches run_dir/heartbeat/rank_N while it trains."""
    return {int(p.name.split("_")[1]) for p in (run_dir / "heartbeat").glob("rank_*")}
