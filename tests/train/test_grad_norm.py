"""Every step's metrics carry the gradient norm: under ZeRO-0 (where DeepSpeed reports none) the trainer
measures it, and it equals DeepSpeed's own figure under ZeRO-1 for the same model, batch and step."""

import copy

import pytest
import torch

from llm.run.recipe import resolve_recipe
from tests.train.helpers import TINY, assembled_trainer


def first_steps(tmp_path, preset: str, steps: int = 2) -> list[float]:
    recipe = copy.deepcopy(TINY)
    recipe["train"].update(grad_accum=2, max_steps=steps)
    recipe.update(deepspeed={"preset": preset}, run_dir=str(tmp_path / preset))
    torch.manual_seed(0)
    trainer = assembled_trainer(resolve_recipe(recipe))
    return [trainer.train_step()["grad_norm"] for _ in range(steps)]


def test_zero0_grad_norm_matches_deepspeeds_under_zero1(tmp_path):
    ours = first_steps(tmp_path, "zero0")
    deepspeed = first_steps(tmp_path, "zero1")
    assert all(isinstance(g, float) and g > 0 for g in ours)
    assert ours == pytest.approx(deepspeed, rel=1e-4)
