"""`train.compile: true`: the DeepSpeed engine compiles the model (inductor on this CPU) and trains it
to the same losses as the eager engine; checkpoints keep the eager parameter names."""

import copy

import pytest
import torch

from llm.run.recipe import resolve_recipe
from tests.train.helpers import TINY, assembled_trainer


def losses(tmp_path, compile: bool, steps: int = 5):
    recipe = copy.deepcopy(TINY)
    recipe["train"].update(compile=compile, max_steps=steps)
    recipe["run_dir"] = str(tmp_path / ("compiled" if compile else "eager"))
    trainer = assembled_trainer(resolve_recipe(recipe))
    out = [trainer.train_step()["loss"] for _ in range(steps)]
    return trainer, out


@pytest.mark.slow
def test_compiled_engine_trains_to_the_eager_losses(tmp_path):
    torch.manual_seed(0)
    _, eager = losses(tmp_path, compile=False)
    torch.manual_seed(0)
    trainer, compiled = losses(tmp_path, compile=True)
    assert trainer.engine.is_compiled
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]
    names = set(trainer.engine.module.state_dict())
    assert names == set(trainer.model.state_dict()) and not any("_orig_mod" in n for n in names)
