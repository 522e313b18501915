"""Reading a Hugging Face directory (config.json, weights) and copying a tokenizer into one.
config.json is plain JSON and the weights are safetensors (or a pytorch_model.bin read with
`llm.fileio.torch_load`): nothing here imports transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.errors import UserError
from llm.fileio import contained, load_safetensors, torch_load


def read_hf_config(path: Path, name: str = "config.json") -> dict:
    """A JSON object file of a Hugging Face directory (config.json, generation_config.json)."""
    file = path / name
    if not file.is_file():
        raise UserError(f"{file}: not found (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
    """All tensors of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin
    (plain tensors only, `llm.fileio.torch_load`). Raises UserError naming the file that is damaged or
    missing, or the index entry that points outside the directory."""
    single, index, pickle = (
        path / "model.safetensors",
        path / "model.safetensors.index.json",
        path / "pytorch_model.bin",
    )
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        tensors = {}
        for shard in index_shards(index):
            tensors.update(load_safetensors(shard))
        return tensors
    if pickle.is_file():
        tensors = torch_load(pickle, map_location="cpu")
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise UserError(f"{pickle}: expected a mapping of tensor names to tensors")
        return tensors
    raise UserError(f"{path}: no weights found (expected model.safetensors, its index, or pytorch_model.bin)")


def index_shards(index: Path) -> list[Path]:
    """The shard files a model.safetensors.index.json names in its weight_map, each a file of the index's
    directory (`llm.fileio.contained`). Raises UserError naming the index and the entry at fault."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a weight index (a JSON object with a weight_map) ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: weight_map: expected a mapping of tensor names to shard files")
    shards = []
    for tensor, name in weight_map.items():
        shard = contained(index.parent, name)
        if shard is None:
            raise UserError(
                f"{index}: weight_map[{tensor!r}] = {name!r} is not a file of this directory (an index names "
                "its shards by plain file name; paths outside it, absolute paths and links out are refused)"
            )
        if shard not in shards:
            shards.append(shard)
    return sorted(shards)


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
