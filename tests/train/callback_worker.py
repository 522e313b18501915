"""A run of the real trainer with two callbacks that count, resumed with `--resume auto`'s rule.

Under torchrun: `python -m tests.train.callback_worker RECIPE.yaml KEY=VALUE ...` assembles the recipe
(with the overrides) as `llm pretrain --resume auto` does, adds `StepCounter` and `RankTally`, and
trains. Each callback appends {"step", "value"} to RUN_DIR/<name>_rank<r>.jsonl after every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm.train.trainer import Callback


class Probe(Callback):
    """Records `value()` after every step, on every rank."""

    def on_step_end(self, trainer, metrics):
        self.count(trainer, metrics)
        line = {"step": trainer.step, "value": self.value()}
        with open(Path(trainer.run_dir) / f"{self.name}_rank{trainer.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class StepCounter(Probe):
    """The steps it has seen and their losses (float64): the same on every rank, saved once."""

    name = "step_counter"

    def __init__(self):
        self.seen, self.losses = 0, torch.zeros(0, dtype=torch.float64)

    def count(self, trainer, metrics):
        self.seen += 1
        self.losses = torch.cat([self.losses, torch.tensor([metrics["loss"]], dtype=torch.float64)])

    def value(self):
        return {"seen": self.seen, "losses": self.losses.tolist()}

    def state_dict(self):
        return {"seen": self.seen, "losses": self.losses}

    def load_state_dict(self, state):
        self.seen, self.losses = state["seen"], state["losses"]


class RankTally(Probe):
    """rank + 1 added after every step: a tensor that differs per rank."""

    name = "rank_tally"
    per_rank = True

    def __init__(self):
        self.tally = torch.zeros((), dtype=torch.float64)

    def count(self, trainer, metrics):
        self.tally += trainer.rank + 1

    def value(self):
        return self.tally.item()

    def state_dict(self):
        return {"tally": self.tally}

    def load_state_dict(self, state):
        self.tally = state["tally"]


def records(run_dir: Path, name: str, rank: int) -> dict[int, object]:
    """A callback's value per step on `rank`; a step recorded twice (before a kill, after the resume) keeps the last."""
    lines = (Path(run_dir) / f"{name}_rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r["value"] for r in map(json.loads, lines)}


if __name__ == "__main__":
    from llm.run.recipe import load_recipe
    from llm.run.train import assemble
    from llm.train.distributed import init_distributed

    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    assemble(recipe, init_distributed(), "auto", callbacks=[StepCounter(), RankTally()]).trainer.fit()
