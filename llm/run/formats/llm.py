"""`--to llm`: llm's own model directory (config.yaml with the task and transforms, model.safetensors,
tokenizer.json); it holds every model llm makes, and `llm.run.loader.load_model` reads it back."""

from __future__ import annotations

from pathlib import Path

from llm.models.base import Model
from llm.run import loader


def check(model: Model) -> str | None:
    return None


def write(model: Model, out_dir: Path, tokenizer: Path | None = None) -> None:
    loader.save_pretrained(model, out_dir, tokenizer)
