"""The one loader: any path -> model, and the llm model directory format.

`load_model(path)` reads:
- an llm model directory: config.yaml (the model's description: `model`
  architecture, `task` with its options, `transforms` in order) + model.safetensors;
- a Hugging Face directory (config.json), with the prefix or soft prompt of an
  `adapter/` in llm's layout put back on it (`llm.run.export` writes that beside
  the frozen base; a PEFT LoRA adapter there is already merged into the weights);
- a training checkpoint: a run directory, its checkpoints/ folder, or one step
  folder, of any ZeRO stage (weights consolidated to fp32).
Every form is rebuilt the same way: build the task's model from the
description, re-apply the recorded transforms, then load the weights strictly
(tied aliases aside), so an adapter or a pruned shape survives a round trip.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from llm import transforms
from llm.config import ConfigError, build_config
from llm.errors import UserError
from llm.fileio import load_safetensors, replace_dir
from llm.log import logger, short_list
from llm.models.base import Model, tied_aliases
from llm.models.config import ModelConfig
from llm.models.fit import build_fitted, check_depth
from llm.models.layers import tensor_parallel_splits
from llm.tasks import Task, get_task
from llm.train import checkpoint as ckpt

CONFIG, WEIGHTS, TOKENIZER = "config.yaml", "model.safetensors", "tokenizer.json"
MODEL_CONFIGS = (CONFIG, "config.json")  # what marks a model directory, llm's or Hugging Face's


def description_config(description: dict, where: str) -> ModelConfig:
    """The architecture of a model description {"model": ..., "task": ..., "transforms": [...]}."""
    if not isinstance(description, dict) or "model" not in description:
        raise UserError(f"{where}: expected a mapping with model: (and task:, transforms:)")
    try:
        return build_config(ModelConfig, description["model"], "model")
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None


def build_from_description(description: dict, where: str) -> Model:
    """A freshly initialised model from {"model": ..., "task": ..., "transforms": [...]}."""
    cfg = description_config(description, where)
    try:
        model = get_task(description.get("task") or "causal_lm").build_model(cfg)
        return transforms.apply_transforms(model, description.get("transforms") or [])
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None


def load_described(description: dict, tensors: dict[str, torch.Tensor], where: str, weights: str) -> Model:
    """The model `description` (read from file `where`) describes, with `tensors` (read from `weights`)
    loaded, built only once a dry run showed that they fit it (`llm.models.fit.build_fitted`)."""
    return build_fitted(
        lambda: build_from_description(description, where),
        lambda model, values: load_weights(model, values, weights),
        tensors,
        description_config(description, where).n_layers,
        where,
    )


def load_weights(model: Model, tensors: dict[str, torch.Tensor], where: str) -> Model:
    """Load `tensors` into `model`, as tolerant as transformers: a tensor the model has must have its
    shape and kind of dtype (floating point or not); tensors the model does not use are ignored with
    one warning naming them; missing trunk tensors are refused, other missing ones (heads, pooler) keep their fresh
    initialisation with one warning naming them. Tied aliases may be left out. A transform's own
    tensors (quantized weights) come as the plain tensors its hooks made (`llm.transforms.plain_state`)."""
    tensors, filled = transforms.load_plain(model, tensors, where)
    expected = {k: v for k, v in model.state_dict().items() if k not in filled}
    for name, tensor in tensors.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise UserError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the model's config implies "
                f"{tuple(expected[name].shape)}"
            )
        if name in expected and expected[name].is_floating_point() != tensor.is_floating_point():
            raise UserError(f"{where}: {name} holds {tensor.dtype} values, the model expects {expected[name].dtype}")
    aliases = tied_aliases(model)
    owner = {id(p): name for name, p in model.named_parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied tensor may come under either name
        if name in aliases and name in tensors:
            tensors.setdefault(owner[id(p)], tensors[name])
    result = model.load_state_dict({k: v for k, v in tensors.items() if k not in aliases}, strict=False)
    missing = sorted(set(result.missing_keys) - aliases - filled)
    required = [k for k in missing if k.startswith("transformer.") and k != "transformer.mask_token"]
    if required:
        raise UserError(f"{where}: the weights do not match the model (missing {', '.join(required[:3])})")
    if result.unexpected_keys:
        unused = result.unexpected_keys
        logger.warning(f"{where}: {len(unused)} tensors the model does not use, ignored: {short_list(unused)}")
    if missing:
        fresh = short_list(missing)
        logger.warning(f"{where}: {len(missing)} tensors not in the weights, freshly initialised: {fresh}")
    return model


# ----------------------------------------------------------------------------
# llm model directories
# ----------------------------------------------------------------------------


def save_pretrained(model: Model, path: str | Path, tokenizer=None) -> Path:
    """Write config.yaml + model.safetensors (+ tokenizer.json, from a path or a Tokenizer) as directory
    `path`, replacing an earlier one whole (`llm.fileio.replace_dir`: readers see the old or the new).

    Weights are written from the in-memory model as they are (tied tensors once; see
    `llm.transforms.plain_state`). Raises UserError when `path` is a folder of other files."""
    from safetensors.torch import save_file

    from llm.models.hf import copy_tokenizer

    with replace_dir(path, replaces=MODEL_CONFIGS) as tmp:
        save_file(transforms.plain_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(yaml.safe_dump(model.description(), sort_keys=False))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
    return Path(path)


def load_pretrained(path: str | Path) -> Model:
    """The model saved in an llm model directory (weights as stored)."""
    from llm.config import load_yaml

    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"{path / name}: not found (an llm model directory holds {CONFIG} and {WEIGHTS})")
    tensors = load_safetensors(path / WEIGHTS)
    return load_described(load_yaml(path / CONFIG), tensors, str(path / CONFIG), str(path / WEIGHTS))


# ----------------------------------------------------------------------------
# Checkpoints and any path
# ----------------------------------------------------------------------------


def checkpoint_dir(path: Path) -> Path:
    """A run directory's checkpoints/ folder; any other path as it is."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() and not (path / ckpt.COMPLETE).exists() else path


def load_checkpoint_model(path: str | Path, tag: str | None = None) -> Model:
    """The model of a checkpoint (any ZeRO stage), rebuilt from its model.yaml, fp32 weights."""
    from llm.config import load_yaml

    step_dir = ckpt.find_checkpoint(checkpoint_dir(Path(path)), tag)
    description = step_dir / "model.yaml"
    if not description.is_file():
        raise UserError(f"{description}: not found (a checkpoint written by llm holds its model's description)")
    described = load_yaml(description)
    where = str(description)
    state = ckpt.consolidated_state_dict(step_dir, merge=lambda parts: merge_tensor_parallel(described, parts, where))
    distill = described.get("distill") if isinstance(described, dict) else None
    prefix = distill.get("student_prefix") if isinstance(distill, dict) else None
    if isinstance(prefix, str) and prefix:  # a distillation run's: the student's weights, not the projection
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return load_described(described, state, where, str(step_dir)).float().eval()


def merge_tensor_parallel(description: dict, parts: list[dict[str, torch.Tensor]], where: str) -> dict:
    """The whole weights of a tensor-parallel checkpoint from its tensor ranks' `parts` (rank order), cut as the
    model `description` (read from `where`) splits them (`llm.models.layers.tensor_parallel_splits` of it, built on
    the meta device once its depth fits the weights)."""
    from llm.train.tensor_parallel import merge_shards

    check_depth(parts[0], description_config(description, where).n_layers, where)
    with torch.device("meta"):
        splits = tensor_parallel_splits(build_from_description(description, where))
    return merge_shards(parts, splits, where)


def model_kind(path: str | Path) -> str:
    """ "hf", "llm" or "checkpoint": what `load_model` will read at `path`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if path.is_file():
        raise UserError(f"{path}: expected a model directory, not a file")
    if (path / "config.json").is_file():
        return "hf"
    if (path / CONFIG).is_file():
        return "llm"
    return "checkpoint"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES.update({"float16": torch.float16, "fp16": torch.float16})


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype for a name ("bf16", "bfloat16", "fp16", "fp32", ...); None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(path: str | Path, tag: str | None = None, dtype: str | torch.dtype | None = None) -> Model:
    """A model from any path: llm model directory, Hugging Face directory, run directory or
    checkpoint (`tag` picks a step), cast to `dtype` when given (rotary tables stay float32).
    Raises UserError naming the path when it is none of these."""
    dtype = parse_dtype(dtype)
    kind = model_kind(path)
    if kind == "hf":
        from llm.adapt.export import ADAPTER_CONFIG, is_virtual_adapter, load_virtual_adapter
        from llm.tasks.hf import from_hf

        model, adapter = from_hf(path, dtype=dtype), Path(path) / "adapter"
        if (adapter / ADAPTER_CONFIG).is_file() and is_virtual_adapter(adapter):
            model = load_virtual_adapter(model, adapter)
        return model
    model = load_pretrained(path) if kind == "llm" else load_checkpoint_model(path, tag)
    return model.to(dtype) if dtype is not None else model


def load_task(path: str | Path, tag: str | None = None) -> Task:
    """The task, with its options (a classifier's label names in its head's row order), of the model
    `load_model(path, tag)` would load, read from its description alone (no weights). Raises UserError
    naming the path when it is no model."""
    from llm.config import load_yaml

    kind = model_kind(path)
    if kind == "hf":
        from llm.models.hf import architecture_of, read_hf_config
        from llm.tasks.hf import task_of_architecture

        config = read_hf_config(Path(path))
        return task_of_architecture(architecture_of(config, str(Path(path) / "config.json")), config)
    if kind == "llm":
        description = Path(path) / CONFIG
    else:
        description = ckpt.find_checkpoint(checkpoint_dir(Path(path)), tag) / "model.yaml"
    if not description.is_file():
        raise UserError(f"{description}: not found (a checkpoint written by llm holds its model's description)")
    described = load_yaml(description)
    try:
        return get_task((described.get("task") if isinstance(described, dict) else None) or "causal_lm")
    except ConfigError as e:
        raise UserError(f"{description}: {e}") from None


def find_tokenizer(path: str | Path, levels: int = 3) -> Path | None:
    """tokenizer.json beside a model, or in a folder above it up to the run directory
    (runs/x/checkpoints/step_100 -> runs/x/tokenizer.json)."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / TOKENIZER).is_file():
            return candidate / TOKENIZER
    return None
