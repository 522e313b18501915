"""Freeze parts of a model: their parameters stop training (requires_grad = False).

`layers` names what stays frozen, each one of:
- "embeddings": token, position, segment and patch embeddings (and the
  embedding norm, [CLS] and mask tokens);
- "blocks": every Transformer block; "blocks.N" one; "blocks.A-B" a range (inclusive);
- "trunk": the whole shared body (embeddings, blocks, final norm, pooler), so
  only the task's head trains;
- any module or parameter name of the model (e.g. "transformer.blocks.0.attn").
A name that matches nothing is an error. Tied weights follow their owner: a
frozen token embedding freezes a tied output projection too.
"""

from __future__ import annotations

import dataclasses

from llm.adapt.base import Transform
from llm.config import ConfigError
from llm.models.base import Model

EMBEDDINGS = ("tok_embed", "pos_embed", "type_embed", "patch_embed", "cls_token", "mask_token", "embed_norm")


@dataclasses.dataclass
class FreezeSettings:
    layers: list[str] = dataclasses.field(default_factory=lambda: ["trunk"])

    def validate(self, path: str) -> None:
        if not self.layers:
            raise ConfigError(f"{path}.layers", "names nothing to freeze")


def _prefixes(model: Model, item: str, path: str) -> list[str]:
    """Module or parameter names that `item` stands for."""
    n = model.config.n_layers
    if item == "embeddings":
        return [f"transformer.{e}" for e in EMBEDDINGS]
    if item == "trunk":
        return ["transformer", "pooler"]
    if item == "blocks":
        return ["transformer.blocks"]
    if item.startswith("blocks."):
        first, _, last = item.removeprefix("blocks.").partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ConfigError(path, f"{item!r}: expected blocks.N or blocks.A-B") from None
        if not 0 <= lo <= hi < n:
            raise ConfigError(path, f"{item!r}: the model has blocks 0-{n - 1}")
        return [f"transformer.blocks.{i}" for i in range(lo, hi + 1)]
    return [item]


ADAPTER_PREFIXES = ("transformer.prefix.", "transformer.prompt.")


def is_adapter(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter (LoRA matrices, a prefix, a soft prompt)."""
    return name.startswith(ADAPTER_PREFIXES) or ".lora_" in name


def trainable_params(model: Model, names: list[str], path: str) -> list:
    """The parameters that `names` selects (a module or parameter name, or a suffix of one, e.g.
    "classifier"), for an adapter method's `trainable` setting: modules that train in full beside
    the adapters, such as a new classification head (PEFT's modules_to_save). Raises ConfigError
    naming `path.trainable[i]` for a name that matches nothing."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for i, item in enumerate(names):
        hits = [p for n, p in params.items() if n == item or n.startswith(item + ".") or ("." + item + ".") in n]
        if not hits:
            raise ConfigError(f"{path}.trainable[{i}]", f"{item!r} matches no parameter of this {model.task} model")
        out += hits
    return out


def freeze_base(model: Model) -> None:
    """Freeze every parameter except those of adapters added before (so adapters combine)."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            p.requires_grad_(False)


def apply(model: Model, s: FreezeSettings, path: str = "freeze") -> Model:
    """Freeze the parameters that `s.layers` names; see the module docstring.

    Raises ConfigError naming `path.layers[i]` for a name that matches no parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for i, item in enumerate(s.layers):
        where = f"{path}.layers[{i}]"
        prefixes = [p.rstrip(".") for p in _prefixes(model, item, where)]
        hits = [name for name in params if any(name == p or name.startswith(p + ".") for p in prefixes)]
        if not hits:
            raise ConfigError(where, f"{item!r} matches no parameter of this {model.task} model")
        for name in hits:
            params[name].requires_grad_(False)
    return model


TRANSFORM = Transform("freeze", FreezeSettings, apply)
