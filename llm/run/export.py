"""Export a trained (possibly adapted) model: a Hugging Face directory of the merged model,
and the adapter beside it."""

from __future__ import annotations

from pathlib import Path

from llm.adapt import export as adapt_export
from llm.errors import UserError
from llm.models import hf
from llm.models.base import Model
from llm.tasks import task_of
from llm.tasks.hf import to_hf


def export_artifacts(model: Model, out_dir: str | Path, tokenizer=None, base_model: str | None = None) -> dict:
    """Write what other tools load from a fine-tuned `model`; returns {"export": dir, "adapter": dir or None}.

    `model` must be whole (not ZeRO-3 partitioned): on a run, the copy that
    `llm.run.train.gathered_copy` makes (all ranks gather, then rank 0 exports).
    - `out_dir/`: a Hugging Face directory (config.json, model.safetensors, and
      `tokenizer`'s tokenizer.json when given) of the model with every transform
      removed: LoRA merged into the weights (W + alpha/r * B @ A), a prefix or soft
      prompt left out (so it is the frozen base plus whatever trained in full).
    - `out_dir/adapter/` for LoRA: PEFT's layout (adapter_config.json +
      adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, dir)`
      loads on the untouched Hugging Face base; `base_model` (e.g. the run's
      init_from) is recorded as its base_model_name_or_path.
    - `out_dir/adapter/` for prefix or prompt tuning: llm's layout (see
      `llm.adapt.export`); `llm.adapt.export.load_virtual_adapter(from_hf(out_dir),
      out_dir / "adapter")` rebuilds the adapted model.
    - no adapter/ for full fine-tuning or freezing.
    Raises UserError when the task or architecture has no Hugging Face form, or the
    adapter cannot be expressed in PEFT's layout (nothing is written then)."""
    out_dir = Path(out_dir)
    task = task_of(model)
    arch = task.hf_architecture(model.config)
    if arch is None:
        raise UserError(f"task {task.name!r} of a {model.config.family!r} model has no Hugging Face architecture")
    adapter = None
    if adapt_export.has_lora(model):
        rules = hf.trunk_rules(model.config, mask_token=task.mask_token) + task.hf_head_rules(model.config)
        prefix = hf.BASE_PREFIX[model.config.family] if task.nested else ""
        adapter = adapt_export.peft_lora(model, rules, prefix, arch, base_model)
    elif adapt_export.has_virtual_tokens(model):
        adapter = adapt_export.virtual_adapter(model)
    to_hf(adapt_export.plain(model), out_dir, tokenizer)
    written = None
    if adapter is not None:
        written = str(adapt_export.write_adapter(out_dir / "adapter", *adapter))
    return {"export": str(out_dir), "adapter": written}
