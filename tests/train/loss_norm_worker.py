"""One optimizer step of the real trainer on given micro-batches; rank 0 saves the step's gradient.

Run in-process (one rank) or under torchrun (`python -m tests.train.loss_norm_worker recipe.yaml
batches.pt out.pt`): rank r trains on micro-batches r, r + world, r + 2 * world, ... of the file.
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


def one_step(recipe, batches: list[dict]) -> dict:
    """{"grads": {name: gradient before the optimizer step}, "metrics": the step's metrics} on this rank."""
    from tests.train.helpers import assembled_trainer

    trainer = assembled_trainer(recipe)
    rank, world = trainer.rank, trainer.world_size
    trainer.train_batches = FixedBatches(batches[rank::world])
    engine, grads = trainer.engine, {}
    step = engine.step

    def capturing_step():
        if engine.is_gradient_accumulation_boundary():
            params = trainer.model.named_parameters()
            grads.update({n: p.grad.detach().clone() for n, p in params if p.grad is not None})
        step()

    engine.step = capturing_step
    metrics = trainer.train_step()
    return {"grads": grads, "metrics": metrics}


if __name__ == "__main__":
    from llm.run.recipe import load_recipe

    recipe_path, batches_path, out = sys.argv[1:4]
    result = one_step(load_recipe(recipe_path), torch.load(batches_path, weights_only=True))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, out)
