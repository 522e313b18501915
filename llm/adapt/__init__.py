"""Model transforms: change a built model before the engine wraps it.

A transform is one file with `apply(model, settings, path) -> model`: it takes a
built model and its section of the recipe (a mapping), and returns the changed
model. `apply_transforms` runs a recipe's `transforms:` list in order and
records each one in `model.transforms`; checkpoints and model directories save
that record, and the loader re-applies it before loading weights, so a
transformed model is rebuilt exactly (the torchtitan model-converter pattern).

Adding a transform is one new file and one line in `TRANSFORMS`.
"""

from __future__ import annotations

from collections.abc import Callable

from llm.adapt import freeze, lora, prefix, prompt
from llm.config import ConfigError
from llm.models.base import Model

TRANSFORMS: dict[str, Callable[[Model, dict, str], Model]] = {
    "freeze": freeze.apply,
    "lora": lora.apply,
    "prefix": prefix.apply,
    "prompt": prompt.apply,
}


def apply_transform(model: Model, spec: dict, path: str = "transforms[0]") -> Model:
    """Apply one transform {name: NAME, setting: value, ...} and record it on the model.

    Raises ConfigError naming `path` for an unknown transform or a bad setting."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(path, f"expected a mapping with name: (one of {', '.join(TRANSFORMS)}), got {spec!r}")
    settings = dict(spec)
    name = settings.pop("name")
    if name not in TRANSFORMS:
        raise ConfigError(f"{path}.name", f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
    model = TRANSFORMS[name](model, settings, path)
    model.transforms.append({"name": name, **settings})
    return model


def apply_transforms(model: Model, specs: list[dict], path: str = "transforms") -> Model:
    """Apply `specs` in order (a recipe's `transforms:` list, or a saved model's record)."""
    for i, spec in enumerate(specs):
        model = apply_transform(model, spec, f"{path}[{i}]")
    return model
