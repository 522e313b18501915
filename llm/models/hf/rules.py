"""Weight rules: one of our tensors and the Hugging Face tensor(s) it is made of.

The same rule maps a checkpoint in (`to_ours`) and a model out (`to_theirs`), so
HF -> llm -> HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.models.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the Hugging Face tensor(s) it is made of.

    op: "copy"; "t" (GPT-2's Conv1D stores weights transposed); "cat" (our fused
    qkv / gate+up is the HF tensors concatenated on dim 0); "conv1x1" (a 1x1
    convolution used as a linear layer). `base` rules live under the trunk prefix.
    """

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    base: bool = True


def linear_rules(ours: str, theirs: str, bias: bool = True, op: str = "copy", base: bool = True) -> list[Rule]:
    """The weight (and bias) of one layer: `ours.weight` <- `theirs.weight`."""
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",), op, base)]
    if bias:
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), "copy", base))
    return rules


def fused_rules(ours: str, theirs: list[str], bias: bool) -> list[Rule]:
    """One fused layer of ours (qkv, gate+up) made of several Hugging Face layers, stacked on dim 0."""
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), "cat")]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), "cat"))
    return rules


def to_ours(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Our tensor of `rule` from its Hugging Face tensors (in `rule.theirs` order)."""
    if rule.op == "t":
        return tensors[0].t()
    if rule.op == "cat":
        return torch.cat(tensors, dim=0)
    if rule.op == "conv1x1":
        return tensors[0].flatten(1) if tensors[0].dim() == 4 else tensors[0]
    return tensors[0]


def to_theirs(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The Hugging Face tensors of `rule` (in `rule.theirs` order) from ours; q/k/v split by `cfg`'s heads."""
    if rule.op == "t":
        return [tensor.t()]
    if rule.op == "cat":
        if len(rule.theirs) == 3:  # q, k, v
            q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
            return list(tensor.split((q, kv, kv), dim=0))
        return list(tensor.chunk(len(rule.theirs), dim=0))
    if rule.op == "conv1x1":
        return [tensor[:, :, None, None] if tensor.dim() == 2 else tensor]
    return [tensor]
