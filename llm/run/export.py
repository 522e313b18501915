"""A run's export: the trained (possibly adapted) model as a Hugging Face directory where
transformers can hold it, else as llm's own model directory; the same writers as `llm convert`."""

from __future__ import annotations

from pathlib import Path

from llm.models.base import Model
from llm.run.convert import write_format
from llm.run.formats import hf


def export_artifacts(model: Model, out_dir: str | Path, tokenizer=None, base_model: str | None = None) -> dict:
    """Write what other tools load from a trained `model` into `out_dir` (replaced whole);
    returns {"export": dir, "format": "hf" or "llm", "adapter": dir or None}.

    `model` must be whole (not ZeRO-3 partitioned): on a run, the copy that
    `llm.run.train.gathered_copy` makes (all ranks gather, then rank 0 exports).
    Where `llm.run.formats.hf.check(model)` passes, `out_dir/` is a Hugging Face directory
    (`llm.run.formats.hf`: LoRA merged, the adapter beside it in adapter/, PEFT's layout for LoRA
    with `base_model`, e.g. the run's init_from, as its base_model_name_or_path; llm's for a prefix
    or soft prompt). Otherwise it is an llm model directory (config.yaml with the task and
    transforms, model.safetensors, tokenizer.json), which loses nothing."""
    out_dir = Path(out_dir)
    if hf.check(model) is None:
        write_format(model, out_dir, "hf", tokenizer, base_model=base_model)
        adapter = out_dir / "adapter"
        return {"export": str(out_dir), "format": "hf", "adapter": str(adapter) if adapter.is_dir() else None}
    write_format(model, out_dir, "llm", tokenizer)
    return {"export": str(out_dir), "format": "llm", "adapter": None}
