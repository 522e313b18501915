"""Reading a Hugging Face directory (config.json, weights) and copying a tokenizer into one.
config.json is plain JSON and the weights are safetensors (or a pytorch_model.bin read with
`torch.load(weights_only=True)`): nothing here imports transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.errors import UserError


def read_hf_config(path: Path, name: str = "config.json") -> dict:
    """A JSON object file of a Hugging Face directory (config.json, generation_config.json)."""
    file = path / name
    if not file.is_file():
        raise UserError(f"{file}: not found (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object")
    return config


def read_chat_template(path: Path) -> str | None:
    """The chat template of a Hugging Face directory's tokenizer, as transformers finds it:
    chat_template.jinja, else the "chat_template" string of tokenizer_config.json; None where neither."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if not (path / "tokenizer_config.json").is_file():
        return None
    template = read_hf_config(path, "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    single, index, pickle = (
        path / "model.safetensors",
        path / "model.safetensors.index.json",
        path / "pytorch_model.bin",
    )
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(str(path / shard)))
            return tensors
        if pickle.is_file():
            return torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, json and unpickling each raise their own types
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    raise UserError(f"{path}: no weights found (expected model.safetensors, its index, or pytorch_model.bin)")


def copy_tokenizer(tokenizer, path: Path) -> None:
    """Copy a tokenizer.json (a path, or a `llm.data.tokenizer.Tokenizer`) into directory `path`."""
    source = Path(getattr(tokenizer, "path", tokenizer))
    if source.is_dir():
        source = source / "tokenizer.json"
    if not source.is_file():
        raise UserError(f"{source}: tokenizer file not found")
    target = path / "tokenizer.json"
    if source.resolve() != target.resolve():
        from llm.fileio import write_atomic

        write_atomic(target, source.read_bytes())
