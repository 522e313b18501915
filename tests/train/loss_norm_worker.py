"""One optimizer step of the real trainer on given micro-batches; rank 0 saves the step's gradient.

Run in-process (one rank) or under torchrun (`python -m tests.train.loss_norm_worker recipe.yaml
batches.pt out.pt`): data-parallel rank r trains on micro-batches r, r + data, r + 2 * data, ... of the
file (every rank is data parallel unless the recipe's `parallel:` says otherwise; the ranks of a sequence
group each take their slice of the same micro-batches).
"""

from __future__ import annotations

import sys

import torch


class FixedBatches:
    """The given micro-batches, in order (the trainer's batch source interface)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.i = batches, 0

    def next_batch(self) -> dict:
        batch = self.batches[self.i]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]

    def rewind(self) -> None:
        self.i = 0


def one_step(recipe, batches: list[dict]) -> dict:
    """{"grads": {name: the whole gradient before the optimizer step}, "metrics": the step's metrics} on this
    rank (DeepSpeed's safe_get_full_grad: the gradient gathered from the ranks under ZeRO 1-3; every rank calls)."""
    return stepped_trainer(recipe, batches)[1]


def stepped_trainer(recipe, batches: list[dict]):
    """(the trainer after one step, `one_step`'s result)."""
    from deepspeed.utils import safe_get_full_grad

    from tests.train.helpers import assembled_trainer

    trainer = assembled_trainer(recipe)
    feed(trainer, batches)
    engine, grads = trainer.engine, {}
    step = engine.step

    def capturing_step():
        if engine.is_gradient_accumulation_boundary():
            full = {n: safe_get_full_grad(p) for n, p in trainer.model.named_parameters()}
            grads.update({n: g.detach().clone() for n, g in full.items() if g is not None})
        step()

    engine.step = capturing_step
    metrics = trainer.train_step()
    return trainer, {"grads": grads, "metrics": metrics}


def feed(trainer, batches: list[dict]) -> None:
    """Make `trainer` train on its rank's micro-batches of `batches` (see the module docstring)."""
    from llm.train.parallel import Mesh, SequenceSlices

    mesh = Mesh.of(trainer.recipe.parallel, trainer.world_size)
    mine = FixedBatches(batches[mesh.coordinates(trainer.rank)[0] :: mesh.data])
    sequence = trainer.sequence
    trainer.train_batches = SequenceSlices(mine, sequence.rank, sequence.size) if sequence else mine


if __name__ == "__main__":
    from llm.run.recipe import load_recipe

    recipe_path, batches_path, out = sys.argv[1:4]
    result = one_step(load_recipe(recipe_path), torch.load(batches_path, weights_only=True))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, out)
