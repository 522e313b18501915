"""The base of every model: the shared trunk, weight initialisation, pooling.

A task (llm.tasks) subclasses `Model` with its head and loss; a model
transform (llm.adapt) changes a built model and records itself in
`model.transforms`, so that a saved model can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llm.models.config import ModelConfig
from llm.models.layers import init_weights
from llm.models.transformer import Transformer


class Model(nn.Module):
    """Base of every task model: holds the config, the trunk and what was done to it.

    `task` names the subclass's objective and `options` its task options (a
    dataclass); `transforms` lists the transforms applied since it was built, as
    (name, settings) records in order. The three together with `config` rebuild it.
    """

    task: str = ""

    def __init__(self, cfg: ModelConfig, options=None, mask_token: bool = False):
        super().__init__()
        self.config = cfg
        self.options = options
        self.transforms: list[dict] = []
        self.transformer = Transformer(cfg, mask_token=mask_token)

    def description(self) -> dict:
        """What rebuilds this model: {"model": ..., "task": {"name": ..., options}, "transforms": [...]}."""
        options = dataclasses.asdict(self.options) if self.options is not None else {}
        return {
            "model": dataclasses.asdict(self.config),
            "task": {"name": self.task, **options},
            "transforms": [dict(t) for t in self.transforms],
        }

    def post_init(self) -> None:
        init_weights(self, self.config)
        if self.config.is_image:
            nn.init.normal_(self.transformer.cls_token, std=self.config.init_std)
            nn.init.normal_(self.transformer.pos_embed, std=self.config.init_std)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (tied weights once); ZeRO-3 partitions count whole. A quantized weight
        (llm.compress.quantized, integer buffers that never train) counts as the weights it stands for."""
        count = sum(
            int(getattr(p, "ds_numel", p.numel())) for p in self.parameters() if p.requires_grad or not trainable_only
        )
        if not trainable_only:
            count += sum(getattr(m, "num_weights", 0) for m in self.modules())
        return count

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.gradient_checkpointing = enabled


class Pooler(nn.Module):
    """dense + tanh over one vector per sequence (BERT's and ViT's pooler)."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per sequence: the first token, the mean of real tokens, or the last real token."""
    if how == "first":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # last: the rightmost real token, whether padding sits left or right
    last = hidden.shape[1] - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that share a tensor with an earlier name (tied embeddings), or lie in a module shared
    with an earlier name (a quantized table that the head and the token embedding share)."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    first: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if first.setdefault(id(m), name) != name:
            aliases.update(m.state_dict(prefix=f"{name}."))
    return aliases
