"""`--to hf`: a Hugging Face directory that transformers loads as it is.

The model with every transform removed (`llm.adapt.export.plain`: LoRA merged into the weights, a
prefix or soft prompt left out; a structurally pruned model as a model of its smaller widths, which
needs every block to keep the same) as config.json + model.safetensors (+ generation_config.json, and
the tokenizer's files when given: an instruction model's template becomes their chat_template); a
quantized model in compressed-tensors' layout (`llm.run.formats.compressed_tensors`); and beside it in
`adapter/`:
- for LoRA: PEFT's layout (adapter_config.json + adapter_model.safetensors), which
  `peft.PeftModel.from_pretrained(base, dir)` loads on the untouched Hugging Face base;
- for prefix or prompt tuning: llm's layout, which `llm.run.loader.load_model` puts back on the base.
"""

from __future__ import annotations

from pathlib import Path

from llm import transforms
from llm.adapt import export as adapt_export
from llm.errors import UserError
from llm.log import logger
from llm.models import hf
from llm.models.base import Model
from llm.run import loader
from llm.run.formats import compressed_tensors
from llm.tasks import task_of
from llm.tasks.classification import ClassificationTask
from llm.tasks.hf import hf_rules, hf_state_dict, task_of_architecture, to_hf

# Transforms a Hugging Face directory can carry: merged (lora), beside it (prefix, prompt), moot (freeze),
# as compressed-tensors (quantize) or as the smaller shapes (prune, where every block keeps the same).
EXPORTABLE = ("lora", "prefix", "prompt", "freeze", "quantize", "prune")
ADAPTERS = ("lora", "prefix", "prompt")


def _record(model: Model, name: str) -> dict | None:
    return next((t for t in model.transforms if t["name"] == name), None)


def _pruned_shape(model: Model) -> str | None:
    """Why the structurally pruned `model`'s shapes have no Hugging Face config, else None."""
    record, cfg = _record(model, "prune"), model.config
    if record["heads"] != [cfg.kv_heads] * cfg.n_layers:
        return (
            f"its blocks keep {record['heads']} of {cfg.kv_heads} attention head groups; fewer heads of the "
            "same size need head_dim != d_model / n_heads, which llm's model config cannot say"
        )
    if len(set(record["neurons"])) != 1:
        return (
            f"its blocks keep different MLP widths {record['neurons']}; transformers gives every layer one "
            "intermediate_size"
        )
    return None


def unpruned(model: Model) -> Model:
    """The structurally pruned `model` (every block of the same widths) as a model of those widths with
    no prune transform: the same tensors, other transforms kept."""
    description = model.description()
    description["model"]["d_ff"] = _record(model, "prune")["neurons"][0]
    description["transforms"] = [t for t in description["transforms"] if t["name"] != "prune"]
    copy = loader.build_from_description(description, "the pruned model")
    return loader.load_weights(copy, transforms.plain_state(model), "the pruned model").eval()


def check(model: Model) -> str | None:
    """Why transformers cannot hold all `model` computes and all llm needs to rebuild it, else None."""
    cfg, task = model.config, task_of(model)
    arch = task.hf_architecture(cfg)  # a LLaMA-family model with Qwen's fields is named for Qwen
    if arch is None:
        return f"transformers has no architecture for task {task.name!r} of a {cfg.family!r} model"
    for t in model.transforms:
        if t["name"] not in EXPORTABLE:
            return f"transformers cannot hold the model's {t['name']!r} transform"
    try:
        hf.family_adapter(cfg.family).check_exportable(cfg, arch)
    except UserError as e:
        return str(e)
    # the task from_hf will read the export as (a chat template reads back the same with any EOS spelling)
    read_back = task_of_architecture(arch, task.hf_config(cfg), task.hf_chat_template("</s>"))
    if read_back.resolved(cfg) != task.resolved(cfg):
        return f"{arch} reads back as task {read_back.resolved(cfg)}, not as the model's {task.resolved(cfg)}"
    if _record(model, "prune") is not None and (reason := _pruned_shape(model)) is not None:
        return reason
    if compressed_tensors.settings(model) is not None:
        if any(t["name"] in ADAPTERS for t in model.transforms):
            return "a quantized model carries no adapters in compressed-tensors"
        return compressed_tensors.check(model)
    return None


def check_base_labels(model: Model, base_model: str | None) -> None:
    """A classifier's PEFT adapter puts its rows on the base, whose config.json names them: refuse
    (UserError) when the base names them otherwise than `model` does."""
    task = task_of(model)
    if base_model is None or not isinstance(task, ClassificationTask) or task.options.labels is None:
        return
    try:
        base = loader.load_task(base_model)
    except UserError:
        return  # a base that is not on this machine names nothing here
    theirs = getattr(base.options, "labels", None)
    if theirs is not None and theirs != task.options.labels:
        raise UserError(
            f"the base {base_model} names the classifier's rows {', '.join(theirs)}; the trained rows are "
            f"{', '.join(task.options.labels)}, which PEFT's adapter cannot say"
        )


def _adapter(model: Model, base_model: str | None) -> tuple[dict, dict] | None:
    """adapter/'s (config, tensors): PEFT's layout for LoRA, llm's for a prefix or soft prompt (a LoRA
    beside one is merged into the weights), None without adapters or where PEFT cannot hold what
    trained beside the LoRA (a tensor outside every rule, a module both adapted and trained in full, a
    classifier whose rows the base names otherwise): the merged weights hold it, a warning names it."""
    if adapt_export.has_virtual_tokens(model):
        if adapt_export.has_lora(model):
            logger.warning(
                "adapter/: the prefix or soft prompt in llm's layout, no PEFT adapter (PEFT cannot hold it "
                "beside LoRA); the LoRA is merged into the exported weights"
            )
        return adapt_export.virtual_adapter(model)
    if not adapt_export.has_lora(model):
        return None
    task = task_of(model)
    prefix, rules = hf_rules(model.config, task)
    try:
        check_base_labels(model, base_model)
        arch = task.hf_architecture(model.config)
        return adapt_export.peft_lora(model, rules, prefix, arch, base_model, task.hf_tied(model.config))
    except UserError as e:
        logger.warning(f"export adapter: not written: {e}; the export holds the merged model")
        return None


def write(model: Model, out_dir: Path, tokenizer: Path | None = None, *, base_model: str | None = None) -> None:
    """`base_model` (a run's init_from) is recorded as a PEFT adapter's base_model_name_or_path."""
    if _record(model, "prune") is not None:
        model = unpruned(model)
    if compressed_tensors.settings(model) is not None:  # carries no adapter (`check`)
        dense = compressed_tensors.float_model(model)
        tensors, config = compressed_tensors.compressed(model, hf_state_dict(dense)[1])
        to_hf(dense, out_dir, tokenizer, tensors=tensors, quantization_config=config)
        return
    adapter = _adapter(model, base_model)
    to_hf(adapt_export.plain(model), out_dir, tokenizer)
    if adapter is not None:
        adapt_export.write_adapter(Path(out_dir) / "adapter", *adapter)
