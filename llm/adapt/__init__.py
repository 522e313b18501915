"""Model transforms for fine-tuning: change a built model before the engine wraps it.

A transform (`llm.adapt.base.Transform`) is one file with its settings dataclass and
`apply(model, settings, path) -> model`. `apply_transforms` runs a list of them in order
and records each one in `model.transforms`; checkpoints and model directories save that
record, and the loader re-applies it before loading weights, so a transformed model is
rebuilt exactly (the torchtitan model-converter pattern).

`ADAPTERS` are this package's transforms, the fine-tuning methods a recipe's `adapt:` names
(`METHODS`, plus `full`: no transform). Every transform, compression's included, is listed
in `llm.transforms`. Adding one is one new file ending in its `TRANSFORM` and one line there
(and one in `ADAPTERS` for a fine-tuning method).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

from llm.adapt import freeze, lora, prefix, prompt
from llm.adapt.base import Transform, record
from llm.config import OneOf
from llm.models.base import Model

ADAPTERS: dict[str, Transform] = {
    t.name: t for t in (freeze.TRANSFORM, lora.TRANSFORM, prefix.TRANSFORM, prompt.TRANSFORM)
}


@dataclasses.dataclass
class Full:
    """`adapt: {method: full}`: every parameter trains; no transform, so no setting."""


# a recipe's `adapt:`: {method: full | freeze | lora | prefix | prompt, setting: value, ...}
METHODS = OneOf("method", {"full": Full, **{name: t.Settings for name, t in ADAPTERS.items()}}, "adapt method")


def apply_transform(
    model: Model, spec, path: str = "transforms[0]", transforms: Mapping[str, Transform] = ADAPTERS
) -> Model:
    """Apply one of `transforms` ({name: NAME, setting: value, ...}, or its built settings) and
    record it on the model.

    Raises ConfigError naming `path` for an unknown transform or a bad setting."""
    union = OneOf("name", {name: t.Settings for name, t in transforms.items()}, "transform")
    settings = copy.deepcopy(union.build(spec, path))  # `apply` may resolve a setting; the caller's stays
    model = transforms[settings.name].apply(model, settings, path)
    model.transforms.append(record(settings))
    return model


def apply_transforms(
    model: Model, specs: list, path: str = "transforms", transforms: Mapping[str, Transform] = ADAPTERS
) -> Model:
    """Apply `specs` in order (a recipe's `transforms:` list, or a saved model's record)."""
    for i, spec in enumerate(specs):
        model = apply_transform(model, spec, f"{path}[{i}]", transforms)
    return model
