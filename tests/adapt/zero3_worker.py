"""Run under torchrun (2 ranks): every method through the real trainer at ZeRO-3, then LoRA's
merge on the sharded model. Rank 0 writes what it found as JSON to argv[1]."""

import json
import sys
from pathlib import Path

import torch

from llm.adapt import lora
from llm.log import setup_logging
from llm.run.train import assemble, gathered_copy
from llm.train.distributed import init_distributed
from tests.adapt.methods import METHODS, compare, recipe, snapshot


def main(out: Path, run_dir: Path) -> None:
    results, dist = {}, None
    for method in METHODS:
        r = recipe(method, run_dir / method, zero_stage=3, micro_batch=2)
        if dist is None:
            dist = init_distributed(r.faults.collective_timeout_s)
            setup_logging(dist.rank)
        parts = assemble(r, dist, "none")
        model = parts.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = snapshot(model)
        for _ in range(3):
            parts.trainer.train_step()
        results[method] = compare(before, snapshot(model), trainable)
        results[method]["trainable"] = sorted(trainable)
        if method == "lora":
            results["merge"] = merge_checks(parts, r)
    if dist.rank == 0:
        out.write_text(json.dumps(results))


@torch.no_grad()
def merge_checks(parts, r) -> dict:
    """Logits of the adapted model, of its gathered copy merged, and of the sharded model merged in place."""
    model = parts.model
    x = torch.randint(0, r.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    adapted = model(x).logits
    copy = lora.merge(gathered_copy(model, 3))
    lora.merge(model)  # in place, on ZeRO-3 partitions: gathered layer by layer
    in_place = model(x).logits
    err = lambda a: float((a.double() - adapted.double()).norm() / adapted.double().norm())
    return {
        "copy_rel_err": err(copy(x).logits),
        "in_place_rel_err": err(in_place),
        "lora_left": [n for n, _ in model.named_parameters() if "lora_" in n],
        "transforms": model.transforms,
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
