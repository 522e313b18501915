"""Export a trained (possibly adapted) model: a Hugging Face directory of the merged model and
the adapter beside it, or llm's own model directory where Hugging Face cannot hold the model."""

from __future__ import annotations

from pathlib import Path

from llm.adapt import export as adapt_export
from llm.errors import UserError
from llm.fileio import replace_dir
from llm.log import logger
from llm.models import hf
from llm.models.base import Model
from llm.run import loader
from llm.tasks import task_of
from llm.tasks.hf import hf_rules, task_of_architecture, to_hf

# Transforms a Hugging Face export can carry: merged (lora), beside it (prefix, prompt) or moot (freeze).
EXPORTABLE = ("lora", "prefix", "prompt", "freeze")


def hf_form(model: Model) -> str | None:
    """The Hugging Face architecture that holds all `model` computes and all llm needs to rebuild it,
    else None: a task or pooling transformers lacks (mean pooling, an instruction template), a
    field the architecture cannot express, or a transform other than those of EXPORTABLE (pruning,
    quantization)."""
    cfg, task = model.config, task_of(model)
    arch = task.hf_architecture(cfg)  # a LLaMA-family model with Qwen's fields is named for Qwen
    if arch is None or any(t["name"] not in EXPORTABLE for t in model.transforms):
        return None
    try:
        hf.family_adapter(cfg.family).check_exportable(cfg, arch)
    except UserError:
        return None
    if arch not in hf.architectures():
        return None
    read_back = task_of_architecture(arch, task.hf_config(cfg))  # the task from_hf will read the export as
    return arch if read_back.resolved(cfg) == task.resolved(cfg) else None


def export_artifacts(model: Model, out_dir: str | Path, tokenizer=None, base_model: str | None = None) -> dict:
    """Write what other tools load from a trained `model` into `out_dir` (replaced whole);
    returns {"export": dir, "format": "hf" or "llm", "adapter": dir or None}.

    `model` must be whole (not ZeRO-3 partitioned): on a run, the copy that
    `llm.run.train.gathered_copy` makes (all ranks gather, then rank 0 exports).
    Where `hf_form(model)` names an architecture:
    - `out_dir/`: a Hugging Face directory (config.json, model.safetensors, and
      `tokenizer`'s tokenizer.json when given) of the model with every transform
      removed: LoRA merged into the weights (W + alpha/r * B @ A), a prefix or soft
      prompt left out (so it is the frozen base plus whatever trained in full);
    - `out_dir/adapter/` for LoRA: PEFT's layout (adapter_config.json +
      adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, dir)`
      loads on the untouched Hugging Face base; `base_model` (e.g. the run's
      init_from) is recorded as its base_model_name_or_path;
    - `out_dir/adapter/` for prefix or prompt tuning: llm's layout (see
      `llm.adapt.export`); `llm.run.loader.load_model(out_dir)` puts it back on the base;
    - no adapter/ for full fine-tuning or freezing.
    Otherwise `out_dir/` is an llm model directory (`loader.save_pretrained`: config.yaml with
    the task and transforms, model.safetensors, tokenizer.json), which loses nothing.
    A LoRA layout that PEFT cannot express also gives the llm directory (with a warning)."""
    out_dir = Path(out_dir)
    arch = hf_form(model)
    adapter = None
    if arch is not None and adapt_export.has_lora(model):
        prefix, rules = hf_rules(model.config, task_of(model))
        try:
            adapter = adapt_export.peft_lora(model, rules, prefix, arch, base_model)
        except UserError as e:  # a layout PEFT cannot express: keep everything in llm's format instead
            logger.warning(f"{out_dir}: exported as an llm model directory, not Hugging Face + PEFT: {e}")
            arch = None
    elif arch is not None and adapt_export.has_virtual_tokens(model):
        adapter = adapt_export.virtual_adapter(model)
    with replace_dir(out_dir, replaces=loader.MODEL_CONFIGS) as staging:  # an earlier export of another format goes
        if arch is None:
            loader.save_pretrained(model, staging, tokenizer)
        else:
            to_hf(adapt_export.plain(model), staging, tokenizer)
        if adapter is not None:
            adapt_export.write_adapter(staging / "adapter", *adapter)
    written = str(out_dir / "adapter") if adapter is not None else None
    return {"export": str(out_dir), "format": "llm" if arch is None else "hf", "adapter": written}
