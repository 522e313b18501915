"""`llm convert`: any model source (Hugging Face, llm directory, training checkpoint) to
an llm model directory or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llm.errors import UserError
from llm.run.loader import find_tokenizer, load_model, model_kind, save_pretrained

KIND_NAMES = {"hf": "Hugging Face directory", "llm": "llm model directory", "checkpoint": "training checkpoint"}


def convert(source: str, output: str, *, to: Literal["llm", "hf"] = "llm", tag: str | None = None) -> str:
    """Convert models between Hugging Face directories, llm directories and training checkpoints.

    The source is a Hugging Face directory (config.json), an llm model directory (config.yaml +
    model.safetensors), or a training checkpoint (a run's checkpoints/ folder or one step inside it,
    any ZeRO stage). --to llm writes config.yaml + model.safetensors; --to hf writes a Hugging Face
    directory.

    Args:
        source: the model to read
        output: the directory to write
        to: output format
        tag: checkpoint step folder to convert (default: the latest)

    Example:
        llm convert path/to/hf-gpt2 models/gpt2              # Hugging Face -> llm
        llm convert models/gpt2 exported/gpt2 --to hf        # llm -> Hugging Face (safetensors)
        llm convert runs/gpt/checkpoints exported/gpt --to hf  # latest ZeRO checkpoint -> Hugging Face
    """
    if to not in ("llm", "hf"):
        raise UserError(f"--to: expected 'llm' or 'hf', got {to!r}")
    source, output = Path(source), Path(output)
    if output.exists() and output.resolve() == source.resolve():
        raise UserError(f"{output}: the output must differ from the source")
    kind = model_kind(source)
    model = load_model(source, tag)
    tokenizer = find_tokenizer(source)
    if to == "llm":
        save_pretrained(model, output, tokenizer)
        written = "llm model directory"
    else:
        from llm.tasks.hf import to_hf

        to_hf(model, output, tokenizer=tokenizer)
        written = "Hugging Face directory"
    cfg = model.config
    extra = " + tokenizer.json" if tokenizer is not None else ""
    summary = (
        f"read {KIND_NAMES[kind]} {source} ({cfg.family} {model.task}), wrote {written} {output}{extra}: "
        f"{model.num_parameters():,} parameters"
    )
    print(summary)
    return summary
