"""`llm convert`: any model source (Hugging Face, llm directory, training checkpoint) to one of the
formats of `FORMATS` (one module each in llm/run/formats/; see llm/run/formats/__init__.py)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal

from llm.errors import UserError
from llm.fileio import replace_dir
from llm.models.base import Model
from llm.run.formats import gguf, hf, onnx, sentence_transformers
from llm.run.formats import llm as llm_format
from llm.run.loader import find_tokenizer, load_model, model_kind

FORMATS = {
    "llm": llm_format,
    "hf": hf,
    "sentence-transformers": sentence_transformers,
    "gguf": gguf,
    "onnx": onnx,
}
# files that mark a directory as an earlier output of some format (anything else is not replaced)
OUTPUTS = ("config.json", "config.yaml", "modules.json", "model.gguf", "model.onnx")
KIND_NAMES = {"hf": "Hugging Face directory", "llm": "llm model directory", "checkpoint": "training checkpoint"}


def holders(model: Model) -> list[str]:
    """The formats that can hold `model`."""
    return [name for name, fmt in FORMATS.items() if fmt.check(model) is None]


def write_format(model: Model, output: str | Path, to: str, tokenizer: Path | None = None, **options) -> Path:
    """Write `model` as format `to` into `output`, replaced whole once complete (the old one is kept
    until then; nothing is left of a failed write). `options` are the format's own (see its `write`).

    Raises UserError naming the format for one that cannot hold the model (and those that can), an
    option the format does not take, a missing runtime dependency, or an output it cannot write."""
    if to not in FORMATS:
        raise UserError(f"--to: expected one of {', '.join(FORMATS)}, got {to!r}")
    fmt = FORMATS[to]
    accepted = inspect.signature(fmt.write).parameters
    for name in options:
        if name not in accepted:
            raise UserError(f"--{name.replace('_', '-')} does not apply to --to {to}")
    reason = fmt.check(model)
    if reason is not None:
        raise UserError(f"--to {to} cannot hold this model: {reason} (formats that can: {', '.join(holders(model))})")
    try:
        with replace_dir(output, replaces=OUTPUTS) as staging:
            fmt.write(model, staging, tokenizer, **options)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise UserError(f"{output}: cannot write ({e.strerror or e}{where})") from None
    return Path(output)


def convert(
    source: str,
    output: str,
    *,
    to: Literal["llm", "hf", "sentence-transformers", "gguf", "onnx"] = "llm",
    tag: str | None = None,
    pooling: Literal["first", "mean", "last"] | None = None,
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] | None = None,
    int8: bool = False,
) -> str:
    """Convert a model to another format: llm's own, Hugging Face, sentence-transformers, GGUF, ONNX.

    The source is a Hugging Face directory (config.json), an llm model directory (config.yaml +
    model.safetensors), or a training checkpoint (a run's checkpoints/ folder or one step inside it,
    any ZeRO stage). --to llm writes config.yaml + model.safetensors (it holds every model);
    --to hf writes a Hugging Face directory. The output directory is replaced whole once the new one
    is complete; a format that cannot hold the model says why and which formats can.

    Args:
        source: the model to read
        output: the directory to write
        to: output format
        tag: checkpoint step folder to convert (default: the latest)
        pooling: sentence-transformers: how a bare encoder pools its tokens (default: mean); a
            contrastive model keeps its own
        gguf_type: gguf: the matrices' type (default: f32; q4_0 for a model llm quantized to int4, group 32)
        int8: onnx: quantize the graph's weights to int8 (ONNX Runtime's dynamic quantization)

    Example:
        llm convert path/to/hf-gpt2 models/gpt2              # Hugging Face -> llm
        llm convert models/gpt2 exported/gpt2 --to hf        # llm -> Hugging Face (safetensors)
        llm convert runs/gpt/checkpoints exported/gpt --to hf  # latest ZeRO checkpoint -> Hugging Face
        llm convert models/gpt2 exported/gpt2-gguf --to gguf --gguf-type q8_0  # llama.cpp: model.gguf
        llm convert runs/classifier/export exported/clf --to onnx --int8      # ONNX Runtime: model.onnx
    """
    # each format's own flags (a new one: a parameter above and an entry here)
    given = {"pooling": pooling, "gguf_type": gguf_type, "int8": int8}
    options = {name: value for name, value in given.items() if value not in (None, False)}
    source, output = Path(source), Path(output)
    if output.exists() and output.resolve() == source.resolve():
        raise UserError(f"{output}: the output must differ from the source")
    kind = model_kind(source)
    model = load_model(source, tag)
    tokenizer = find_tokenizer(source)
    write_format(model, output, to, tokenizer, **options)
    cfg = model.config
    extra = " + tokenizer" if tokenizer is not None else ""
    summary = (
        f"read {KIND_NAMES[kind]} {source} ({cfg.family} {model.task}), wrote {output} (--to {to}){extra}: "
        f"{model.num_parameters():,} parameters"
    )
    print(summary)
    return summary
