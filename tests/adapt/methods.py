"""What the training tests share: one recipe per method, parameter snapshots (gathered under ZeRO-3)."""

from __future__ import annotations

import contextlib

import torch

from tests.train.helpers import TINY

# Each method as a recipe's `transforms:` list on the TINY GPT (2 blocks).
METHODS = {
    "lora": [{"name": "lora", "rank": 4, "alpha": 8, "targets": ["q", "v", "fc_out"]}],
    "prefix": [{"name": "prefix", "num_virtual_tokens": 4}],
    "prompt": [{"name": "prompt", "num_virtual_tokens": 4}],
    "freeze": [{"name": "freeze", "layers": ["embeddings", "blocks.0"]}],
}


def recipe(method: str, run_dir, zero_stage: int = 0, micro_batch: int = 4, steps: int = 3, save: bool = False):
    from llm.run.recipe import resolve_recipe

    data = {**TINY, "transforms": METHODS[method], "run_dir": str(run_dir)}
    data["train"] = {**TINY["train"], "max_steps": steps, "micro_batch_size": micro_batch}
    data["checkpoint"] = {"save_final": save}
    data["deepspeed"] = {"zero_stage": zero_stage}
    data["optim"] = {"lr": 1e-2}
    return resolve_recipe(data)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered from all ranks under ZeRO-3; all ranks call)."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def compare(before: dict, after: dict, trainable: set[str]) -> dict[str, list[str]]:
    """Names of frozen parameters that changed and of trainable ones that did not."""
    assert before.keys() == after.keys()
    return {
        "frozen_changed": [n for n in before if n not in trainable and not torch.equal(before[n], after[n])],
        "trainable_unchanged": [n for n in trainable if torch.equal(before[n], after[n])],
    }
