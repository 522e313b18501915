"""Under torchrun: one step of the real trainer for each case of a file, in one launch, then the whole model
gathered as the export gathers it, a checkpoint, and a trainer resumed from it.

    torchrun --nproc_per_node N -m tests.train.tensor_parallel_worker cases.pt out.pt

cases.pt holds [{"recipe": mapping, "batches": [micro-batch, ...]}, ...]; each case's checkpoint goes to its
recipe's run_dir. Rank 0 saves, per case, every rank's gradients (its parts of the sharded parameters) and
parameter count, the step's metrics, the validation metrics on the same batches after it, the whole model after
the step, and whether every rank's trainer resumed from the checkpoint takes the next step bit for bit as the
trainer that saved it does.
"""

from __future__ import annotations

import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist

    from llm.run.recipe import resolve_recipe
    from llm.run.train import gathered_copy
    from tests.train.helpers import assembled_trainer
    from tests.train.loss_norm_worker import feed, stepped_trainer

    cases_path, out = sys.argv[1:3]
    results = []
    for case in torch.load(cases_path, weights_only=True):
        trainer, result = stepped_trainer(resolve_recipe(case["recipe"]), case["batches"])
        whole = gathered_copy(trainer.model, trainer.engine.zero_optimization_stage(), trainer.tensor)
        step_dir = trainer.save()
        evaluated = trainer.evaluate(trainer.train_batches, 1)
        ranks = [None] * dist.get_world_size()
        mine = {"grads": result["grads"], "parameters": sum(p.numel() for p in trainer.model.parameters())}
        dist.all_gather_object(ranks, mine)
        # the trainer that saved the checkpoint, and a fresh run's trainer resumed from it (whose assembly reseeds
        # the process's RNGs: after), take the same next step on the same batch
        feed(trainer, case["batches"])
        trainer.train_step()
        resumed = assembled_trainer(resolve_recipe({**case["recipe"], "run_dir": case["recipe"]["run_dir"] + "-r"}))
        feed(resumed, case["batches"])  # the data position it restores is that of the fixed batches
        resumed.resume(str(step_dir))
        feed(resumed, case["batches"])
        resumed.train_step()
        same = all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), resumed.model.parameters()))
        resumes = [None] * dist.get_world_size()
        dist.all_gather_object(resumes, same)
        results.append(
            {"ranks": ranks, "metrics": result["metrics"], "eval": evaluated, "whole": whole.state_dict(),
             "resumes": resumes}
        )  # fmt: skip
    if dist.get_rank() == 0:
        torch.save(results, out)
