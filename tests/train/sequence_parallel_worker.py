"""Under torchrun: `tests.train.loss_norm_worker.one_step` for each case of a file, in one launch.

    torchrun --nproc_per_node N -m tests.train.sequence_parallel_worker cases.pt out.pt

cases.pt holds [{"recipe": mapping, "batches": [micro-batch, ...]}, ...]; rank 0 saves the list of results.
"""

from __future__ import annotations

import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist

    from llm.run.recipe import resolve_recipe
    from tests.train.loss_norm_worker import one_step

    cases_path, out = sys.argv[1:3]
    results = [one_step(resolve_recipe(c["recipe"]), c["batches"]) for c in torch.load(cases_path, weights_only=True)]
    if dist.get_rank() == 0:
        torch.save(results, out)
