"""Every model transform, in one explicit list, and what the loader does with them.

`TRANSFORMS` holds the fine-tuning transforms of llm.adapt (freeze, lora, prefix, prompt) and
the compression transforms of llm.compress (quantize, prune); a recipe's `transforms[i]` is one
of their settings (`SETTINGS`), checked when the recipe is loaded. `apply_transforms` applies
and records them (a recipe's list, or a saved model's record), and `plain_state` / `load_plain`
let the loader save and load the weights of any transformed model through each transform's own
hooks, knowing none of them.

Adding a transform: one file in llm/adapt or llm/compress ending in its `TRANSFORM`
(`llm.adapt.base.Transform`), and one line below.
"""

from __future__ import annotations

import torch

from llm import adapt
from llm.adapt import freeze, lora, prefix, prompt
from llm.adapt.base import Transform
from llm.compress import prune, quantize
from llm.config import OneOf
from llm.models.base import Model, tied_aliases

TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        freeze.TRANSFORM,
        lora.TRANSFORM,
        prefix.TRANSFORM,
        prompt.TRANSFORM,
        quantize.TRANSFORM,
        prune.TRANSFORM,
    )
}
# a recipe's `transforms[i]`: {name: NAME, setting: value, ...} built into that transform's settings
SETTINGS = OneOf("name", {name: t.Settings for name, t in TRANSFORMS.items()}, "transform")


def apply_transform(model: Model, spec, path: str = "transforms[0]") -> Model:
    """Apply one transform ({name: NAME, setting: value, ...}, or its built settings) and record it
    on the model. Raises ConfigError naming `path` for an unknown transform or a bad setting."""
    return adapt.apply_transform(model, spec, path, TRANSFORMS)


def apply_transforms(model: Model, specs: list, path: str = "transforms") -> Model:
    """Apply `specs` in order (a recipe's `transforms:` list, or a saved model's record)."""
    return adapt.apply_transforms(model, specs, path, TRANSFORMS)


def _recorded(model: Model) -> list[Transform]:
    return [TRANSFORMS[r["name"]] for r in model.transforms]


def plain_state(model: Model) -> dict[str, torch.Tensor]:
    """The model's weights as plain CPU tensors for safetensors: its state dict, tied aliases left
    out, each recorded transform's tensors made plain by its `save_state`."""
    aliases = tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    for t in _recorded(model):
        if t.save_state is not None:
            state = t.save_state(state)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_plain(model: Model, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, set[str]]:
    """Copy the plain tensors each recorded transform saved (`plain_state`) into `model`: (the other
    tensors, the state-dict names filled). Raises UserError naming `where` when they do not fit."""
    tensors, filled = dict(tensors), set()
    for t in _recorded(model):
        if t.load_state is not None:
            tensors, names = t.load_state(model, tensors, where)
            filled |= names
    return tensors, filled
