"""`init_from`: the model a run starts from, with everything an earlier run trained carried into it.

The model at `init_from` (a checkpoint of any ZeRO stage, a run directory, an llm model directory,
a Hugging Face directory) comes rebuilt with the record of its transforms (`llm.run.loader`). What
the earlier run trained either carries into the new run or stops it with one line saying what
would be lost; nothing is dropped silently:

- an adapter (LoRA, prefix, soft prompt) that the recipe continues keeps training from its trained
  tensors, as PEFT's `PeftModel.from_pretrained(model, adapter, is_trainable=True)` does. The
  recipe continues it with a transform (in `transforms:` or `adapt:`) of the same name and
  settings; those that steer training alone (`Transform.training_only`: dropout, initialisation,
  `trainable`) may differ;
- LoRA that the recipe does not continue (`adapt: full`, another method, another rank, alpha or
  targets) is merged into the weights first (W + alpha/rank * B @ A, PEFT's `merge_and_unload`):
  the model computes what it computed, and the recipe's method trains from there;
- a prefix or soft prompt that the recipe does not continue is refused: it cannot be merged into
  the weights, so the run would lose it;
- a structurally pruned model's smaller shapes are rebuilt and its weights follow; a quantized
  model is refused (its float weights are gone; so is a LoRA trained on a quantized base, QLoRA);
  a freeze trained nothing, so the recipe alone decides what trains.

Every tensor of the shared body (trunk, pooler) loads and must fit. Head tensors load where the
task and shapes agree; the others are freshly initialised, and tensors of `init_from` the run has
no place for (the head of another task) are named in the log.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llm import transforms
from llm.adapt import lora
from llm.adapt.export import ADAPTER_CONFIG, VIRTUAL, is_virtual_adapter
from llm.config import ConfigError
from llm.log import logger, short_list
from llm.models.base import Model, tied_aliases
from llm.run import loader
from llm.tasks import task_of
from llm.tasks.classification import ClassificationTask

BODY = ("transformer.", "pooler.")
Steps = list[tuple[str, Any]]  # (path in the recipe, transform settings), as RecipeConfig.transform_settings gives


def build(model: Model, source: str, steps: Steps) -> Model:
    """`model` (freshly built for the run's task) with the weights of the model at `source`, then the
    recipe's transform `steps` applied, each adapter of `source` that a step continues with its
    trained tensors; see the module docstring. Raises ConfigError naming `init_from` (or the step)
    when `source` is another family, quantized, carries a prefix or soft prompt the recipe does not
    continue, or has a body tensor of another shape."""
    init = loader.load_model(source)
    if init.config.family != model.config.family:
        raise ConfigError(
            "init_from",
            f"{source}: a {init.config.family} model ({init.task}); the run builds a "
            f"{model.config.family} model for task {model.task!r}",
        )
    continued = _continued(init, steps, source)
    for record in init.transforms:  # a pruned model's smaller shapes; its weights follow
        if record["name"] == "prune":
            model = transforms.apply_transform(model, record, "init_from")
    state, rows = init.state_dict(), ""
    task = task_of(model)
    if isinstance(task, ClassificationTask):  # the head's rows follow their label names
        state, rows = task.head_from(task_of(init), state, model.state_dict())
    loaded = _load_body_and_head(model, state, source)
    fresh = sorted(set(model.state_dict()) - loaded - tied_aliases(model))
    for path, settings in steps:
        before = set(model.state_dict())
        model = transforms.apply_transform(model, settings, path)
        if path in continued:
            loaded |= _load_adapter(model, state, set(model.state_dict()) - before, path, source)
            logger.info(f"init_from {source}: {path} continues the {settings.name} the model was trained with")
    unused = sorted(set(state) - loaded - tied_aliases(init))
    logger.info(
        f"init_from {source} ({init.task}): loaded {len(loaded)} tensors; freshly initialised: "
        f"{', '.join(fresh) if fresh else 'none'}"
        + (f"; not used: {short_list(unused)}" if unused else "")
        + (f"; {rows}" if rows else "")
    )
    return model


def same_transform(record: dict, settings) -> bool:
    """Whether `settings` (a recipe's transform) rebuild the transform `record` describes: the same
    name and every setting equal but those that steer training alone (`Transform.training_only`)."""
    if settings.name != record["name"]:
        return False
    steer = _training_only(record["name"])
    keep = lambda s: {k: v for k, v in dataclasses.asdict(s).items() if k not in steer}
    return keep(transforms.SETTINGS.build(dict(record), "init_from")) == keep(settings)


def _describe(record: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in record.items() if k != "name")


def _continued(init: Model, steps: Steps, source: str) -> dict[str, dict]:
    """{recipe path: the record of `init`'s adapter that step continues}. LoRA of `init` not
    continued is merged into its weights (in place); a quantized `init`, or a prefix or soft prompt
    not continued, is a ConfigError naming `init_from`."""
    free, continued, merge = list(steps), {}, []
    for record in init.transforms:
        name = record["name"]
        if name == "quantize":
            raise ConfigError(
                "init_from",
                f"{source}: a quantized model ({_describe(record)}) cannot be trained further (its float weights "
                "are gone); start from the model it was quantized from (a recipe's transforms: [{name: quantize}] "
                "trains on a quantized copy of it)",
            )
        if name != "lora" and name not in VIRTUAL:
            continue
        match = next(((path, s) for path, s in free if same_transform(record, s)), None)
        if match is not None:
            free.remove(match)
            continued[match[0]] = record
        elif name == "lora":
            merge.append(record)
        else:
            raise ConfigError(
                "init_from",
                f"{source}: the model carries a {name} ({_describe(record)}) trained by an earlier run; it cannot "
                f"be merged into the weights and this recipe does not continue it, so it would be lost. Continue "
                f"it with adapt: {{method: {name}, {_describe(record)}}} (only {', '.join(_training_only(name))} "
                "may change), or start from a model without it",
            )
    if merge:  # LoRA merges all layers at once: a continued LoRA beside a merged one starts afresh
        continued = {path: r for path, r in continued.items() if r["name"] != "lora"}
        lora.merge(init)
        logger.info(
            f"init_from {source}: its LoRA ({'; '.join(_describe(r) for r in merge)}) is merged into the weights, "
            "as the recipe does not continue it (that takes a lora transform with the same rank, alpha and targets)"
        )
    if _merged_peft_adapter(source):
        logger.info(
            f"init_from {source}: a Hugging Face export whose LoRA adapter (adapter/) is merged into its weights; "
            "the run starts from the merged model (start from the run's checkpoints to continue the adapter itself)"
        )
    return continued


def _training_only(name: str) -> tuple[str, ...]:
    return transforms.TRANSFORMS[name].training_only


def _merged_peft_adapter(source: str) -> bool:
    """Whether `source` is a Hugging Face export with a PEFT LoRA adapter beside its merged weights."""
    adapter = Path(source) / "adapter"
    return (
        loader.model_kind(source) == "hf" and (adapter / ADAPTER_CONFIG).is_file() and not is_virtual_adapter(adapter)
    )


def _load_body_and_head(model: Model, state: dict, source: str) -> set[str]:
    """Copy the tensors of `state` that `model` has with the same shape; returns their names. A body
    tensor of another shape is a ConfigError; a head tensor of another shape is left fresh."""
    own = model.state_dict()
    loaded = {}
    for key, tensor in state.items():
        if key not in own:
            continue
        if own[key].shape != tensor.shape:
            if key.startswith(BODY):
                raise ConfigError(
                    "init_from",
                    f"{source}: {key} has shape {tuple(tensor.shape)}, "
                    f"the recipe's model needs {tuple(own[key].shape)}",
                )
            continue
        loaded[key] = tensor
    model.load_state_dict(loaded, strict=False)
    return set(loaded)


def _load_adapter(model: Model, state: dict, names: set[str], path: str, source: str) -> set[str]:
    """Copy the trained adapter tensors `names` (those the step at `path` added) from `state`."""
    own = model.state_dict()
    for name in sorted(names):
        if name not in state or state[name].shape != own[name].shape:
            found = tuple(state[name].shape) if name in state else "nothing"
            raise ConfigError(
                path,
                f"continues the adapter of init_from {source}, which has {found} for {name}, "
                f"not {tuple(own[name].shape)}",
            )
    model.load_state_dict({name: state[name] for name in names}, strict=False)
    return set(names)
