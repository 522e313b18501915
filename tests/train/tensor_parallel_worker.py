"""Under torchrun: one step of the real trainer for each case of a file, in one launch, then the whole model
gathered as the export gathers it and a checkpoint.

    torchrun --nproc_per_node N -m tests.train.tensor_parallel_worker cases.pt out.pt

cases.pt holds [{"recipe": mapping, "batches": [micro-batch, ...]}, ...]; each case's checkpoint goes to its
recipe's run_dir. Rank 0 saves, per case, every rank's gradients (its parts of the sharded parameters) and
parameter count, the step's metrics, and the whole model after the step.
"""

from __future__ import annotations

import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist

    from llm.run.recipe import resolve_recipe
    from llm.run.train import gathered_copy
    from tests.train.loss_norm_worker import stepped_trainer

    cases_path, out = sys.argv[1:3]
    results = []
    for case in torch.load(cases_path, weights_only=True):
        trainer, result = stepped_trainer(resolve_recipe(case["recipe"]), case["batches"])
        whole = gathered_copy(trainer.model, trainer.engine.zero_optimization_stage(), trainer.tensor)
        trainer.save()
        ranks = [None] * dist.get_world_size()
        mine = {"grads": result["grads"], "parameters": sum(p.numel() for p in trainer.model.parameters())}
        dist.all_gather_object(ranks, mine)
        results.append({"ranks": ranks, "metrics": result["metrics"], "whole": whole.state_dict()})
    if dist.get_rank() == 0:
        torch.save(results, out)
