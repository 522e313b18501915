"""`llm convert`: any model source (Hugging Face, llm directory, training checkpoint) to
an llm model directory or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from llm.errors import UserError
from llm.run.loader import find_tokenizer, load_model, model_kind, save_pretrained

KIND_NAMES = {"hf": "Hugging Face directory", "llm": "llm model directory", "checkpoint": "training checkpoint"}


def convert(source: str | Path, output: str | Path, to: str = "llm", tag: str | None = None) -> str:
    """Read `source`, write `output` in format `to` ("llm" or "hf"); returns a one-line summary."""
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
    return (
        f"read {KIND_NAMES[kind]} {source} ({cfg.family} {model.task}), wrote {written} {output}{extra}: "
        f"{model.num_parameters():,} parameters"
    )
