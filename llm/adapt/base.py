"""What a model transform is: a name, its settings and `apply(model, settings, path) -> model`.

A transform changes a built model before the engine wraps it (LoRA adapters, a frozen trunk,
a quantized or pruned model), as torchtitan's model converters do. Its settings are a dataclass
checked when a recipe is loaded (a `OneOf` union by name, so a misspelt or out-of-range setting
is refused before any process group, naming the path as the user wrote it); `apply` makes the
checks that need the model (a LoRA target that matches no layer) and raises ConfigError naming
`path`. A transform whose weights are not plain tensors (quantization) also says how to turn them
into plain tensors for safetensors (`save_state`) and back (`load_state`), so the loader saves
and loads any transformed model without knowing the transform.

Each file of llm/adapt and llm/compress that is a transform ends with its `TRANSFORM`; the
explicit list of all of them is `llm.transforms.TRANSFORMS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from llm.config import fields_set
from llm.models.base import Model

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Transform:
    """One model transform; see the module docstring.

    `apply(model, settings, path)`: the changed model (in place), settings an instance of
    `Settings`; it may resolve a setting for the record (prompt tuning stores the ids of its
    `init_text`). `save_state(tensors)`: the model's state dict with this transform's tensors
    replaced by plain ones. `load_state(model, tensors, where)`: copies those plain tensors into
    the transformed model; returns (the other tensors, the state-dict names it filled).
    `training_only`: the settings that steer training alone (dropout, initialisation, what trains
    beside): a later run may change them and still continue the tensors this transform trained
    (`llm.run.init_from`); the others shape those tensors or what they compute."""

    name: str
    Settings: type
    apply: Callable[[Model, Any, str], Model]
    save_state: Callable[[Tensors], Tensors] | None = None
    load_state: Callable[[Model, Tensors, str], tuple[Tensors, set[str]]] | None = None
    training_only: tuple[str, ...] = ()


def record(settings) -> dict:
    """The model's record of a transform, {name: NAME, setting: value, ...}: the settings its
    mapping gave and those `apply` resolved, settings left at None omitted. Model directories and
    checkpoints save it; the loader re-applies it."""
    defaults = type(settings)()
    given = fields_set(settings)
    return {
        k: v
        for k, v in dataclasses.asdict(settings).items()
        if v is not None and (k in given or v != getattr(defaults, k))
    }
