"""Model directories: save, load, and find what a path holds.

An llm model directory holds config.yaml (the ModelConfig), model.safetensors
and, when there is one, tokenizer.json. `load_model` also reads Hugging Face
directories and training checkpoints, so every command takes any of the three.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from llm.errors import UserError
from llm.models.heads import Model
from llm.models.hf import copy_tokenizer, tied_aliases

CONFIG, WEIGHTS, TOKENIZER = "config.yaml", "model.safetensors", "tokenizer.json"


def save_pretrained(model: Model, path: str | Path, tokenizer=None) -> Path:
    """Write config.yaml + model.safetensors (+ tokenizer.json, from a path or a Tokenizer) into `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in aliases}
    (path / CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(model.config), sort_keys=False))
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)
    return path


def load_pretrained(path: str | Path) -> Model:
    """The model saved in an llm model directory (fp32 weights as stored)."""
    from safetensors.torch import load_file

    from llm.config import load_model_config
    from llm.models import build_model

    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"{path / name}: not found (an llm model directory holds {CONFIG} and {WEIGHTS})")
    model = build_model(load_model_config(path / CONFIG))
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{path / WEIGHTS}: cannot read ({e})") from None
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise UserError(
                f"{path / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                f"{CONFIG} implies {tuple(expected[name].shape)}"
            )
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - tied_aliases(model)
    if missing or result.unexpected_keys:
        what = [f"missing {', '.join(sorted(missing)[:3])}"] if missing else []
        what += [f"unexpected {', '.join(result.unexpected_keys[:3])}"] if result.unexpected_keys else []
        raise UserError(f"{path / WEIGHTS}: does not match {CONFIG} ({'; '.join(what)})")
    return model


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


def load_model(path: str | Path, tag: str | None = None) -> Model:
    """A model from a Hugging Face directory, an llm model directory, or a training
    checkpoint (a run's checkpoints/ folder, or one step folder; `tag` picks the step)."""
    kind = model_kind(path)
    if kind == "hf":
        from llm.models.hf import from_hf

        return from_hf(path)
    if kind == "llm":
        return load_pretrained(path)
    try:
        from llm.train.checkpoint import load_model_from_checkpoint
    except ImportError as e:
        raise UserError(
            f"{path}: neither a model directory (config.json, or {CONFIG} + {WEIGHTS}) nor readable as a "
            f"training checkpoint here ({e})"
        ) from None
    return load_model_from_checkpoint(path, tag)


def find_tokenizer(path: str | Path, levels: int = 2) -> Path | None:
    """tokenizer.json beside a model, or in a folder above it up to the run directory
    (runs/x/checkpoints/step_100 -> runs/x/tokenizer.json)."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / TOKENIZER).is_file():
            return candidate / TOKENIZER
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once each (tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())
