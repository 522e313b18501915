"""Whole models to and from Hugging Face directories: the trunk of the family's adapter
(llm.models.hf) joined with the head of the task that answers to the architecture."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llm.config import ConfigError, build_config
from llm.errors import UserError
from llm.fileio import replace_dir
from llm.log import logger, short_list
from llm.models import hf
from llm.models.base import Model, tied_aliases
from llm.models.config import ModelConfig
from llm.models.fit import build_fitted
from llm.tasks import TASKS, get_task, task_of
from llm.tasks.base import Task
from llm.tasks.instruction import InstructionOptions


def task_of_architecture(arch: str, config: dict, chat_template: str | None = None) -> Task:
    """The task, with its options, that a Hugging Face model of architecture `arch`, config.json
    `config` and tokenizer chat template `chat_template` reads as (e.g. BertForPreTraining: masked_lm
    with nsp, the labels of id2label; a causal LM with the chat template an instruction model exports:
    that instruction task)."""
    _, name, implied = hf.architectures()[arch]
    if name == "causal_lm" and chat_template is not None:
        options = InstructionOptions.from_chat_template(chat_template)
        if options is not None:
            return get_task({"name": "instruction", **dataclasses.asdict(options)})
    task_class = TASKS[name]
    return task_class({**implied, **task_class({}, "task").hf_options(config)})


def hf_rules(cfg: ModelConfig, task: Task) -> tuple[str, list[hf.Rule]]:
    """(trunk prefix, rules) of a `task` model of `cfg`: every tensor and its Hugging Face name(s),
    rules with `base` under the prefix ("transformer." in GPT2LMHeadModel; "" where the
    architecture is the bare trunk)."""
    adapter = hf.family_adapter(cfg.family)
    rules = adapter.trunk_rules(cfg, mask_token=task.mask_token) + task.hf_head_rules(cfg)
    return adapter.prefix if task.nested else "", rules


SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_tokens(config: dict, generation: dict, vocab_size: int, where: str) -> dict:
    """bos/eos/pad ids from config.json, overridden by generation_config.json where it sets them
    (as transformers' generate does); eos may be a list. Ids outside the vocabulary are dropped
    with a warning."""
    out = {}
    for name in SPECIAL:
        value = generation[name] if generation.get(name) is not None else config.get(name)
        values = value if isinstance(value, list) else [] if value is None else [value]
        kept = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size]
        if len(kept) != len(values):
            logger.warning(f"{where}: {name} {value!r}: ids outside the vocabulary [0, {vocab_size}) dropped")
        if kept:
            out[name] = kept if name == "eos_token_id" and len(kept) > 1 else kept[0]
    return out


def from_hf(path: str | Path, task: str | dict | None = None, dtype: torch.dtype | None = None) -> Model:
    """The model in a Hugging Face directory (config.json + safetensors or pytorch_model.bin,
    and generation_config.json when there is one), in `dtype` (default: float32).

    Loading tolerates what transformers tolerates: tensors the model does not use (a
    BertForMaskedLM checkpoint's `cls.seq_relationship.*`) are ignored with one warning naming
    them; missing optional modules (heads, pooler, mask token) are freshly initialised with one
    warning naming them. `task` builds another head on the same trunk (e.g.
    "text_classification" from a BertModel). Raises UserError naming the file for an
    unsupported architecture or config field, a trunk tensor that is missing, or a misshapen tensor.
    """
    path = Path(path)
    config = hf.read_hf_config(path)
    file = path / "config.json"
    arch = hf.architecture_of(config, str(file))
    adapter, source_name, _ = hf.architectures()[arch]
    fields = adapter.config_from_hf(config, str(file))
    generation = {}
    if (path / "generation_config.json").is_file():
        generation = hf.read_hf_config(path, "generation_config.json")

    prefix = adapter.prefix if TASKS[source_name].nested else ""
    tensors = hf.read_hf_weights(path)
    if isinstance(config.get("quantization_config"), dict):
        tensors = dequantized(tensors, config["quantization_config"], str(file))
    weights, stored = {}, {}  # stored: each key as the checkpoint spells it, for warnings
    for name, tensor in tensors.items():
        key = name.removeprefix(prefix)
        for legacy, today in adapter.legacy_names.items():
            key = key.replace(legacy, today)
        weights[key], stored[key] = tensor, name
    fields["pooler"] = "pooler.dense.weight" in weights
    try:
        cfg = build_config(ModelConfig, fields, "model")
        if not cfg.is_image:
            cfg = dataclasses.replace(cfg, **special_tokens(config, generation, cfg.vocab_size, str(path)))
        source_task = task_of_architecture(arch, config, hf.read_chat_template(path))
        target = source_task if task is None else get_task(task)
    except ConfigError as e:
        raise UserError(f"{file}: {e}") from None

    def build() -> Model:
        try:
            return target.build_model(cfg)
        except ConfigError as e:
            raise UserError(f"{file}: {e}") from None

    def load(model: Model, values: dict) -> Model:
        return _load_hf_weights(model, target, values, stored, source_task, prefix, arch, path)

    model = build_fitted(build, load, weights, cfg.n_layers, str(file))
    return model.to(dtype) if dtype is not None else model


def _load_hf_weights(
    model: Model, target: Task, weights: dict, stored: dict, source_task: Task, prefix: str, arch: str, path: Path
) -> Model:
    """`model` (a `target` model) with the Hugging Face `weights` (keys relative to the source's trunk
    prefix) loaded through the rules of its task; see `from_hf`."""
    cfg = model.config
    adapter = hf.family_adapter(cfg.family)
    ours, used, missing = {}, set(), []
    _, rules = hf_rules(cfg, target)
    for rule in rules:
        if all(t in weights for t in rule.theirs):
            ours[rule.ours] = hf.to_ours(rule, [weights[t] for t in rule.theirs])
            used.update(rule.theirs)
        else:
            missing.append(rule)
    required = [r for r in missing if r.ours.startswith("transformer.") and r.ours not in OPTIONAL]
    if required:
        names = [t for r in required[:4] for t in r.theirs if t not in weights]
        raise UserError(f"{path}: weights for {arch} lack {', '.join(names)} ({len(required)} tensors missing)")
    ignored = set(source_task.hf_ignored(cfg)) | set(target.hf_ignored(cfg))
    unused = [k for k in weights if k not in used and not k.endswith(adapter.ignored_suffixes) and k not in ignored]
    if unused:
        unused = [stored[k] for k in unused]
        logger.warning(f"{path}: {len(unused)} tensors that {arch} does not use, ignored: {short_list(unused)}")
    if missing:
        fresh = [(prefix if r.base else "") + t for r in missing for t in r.theirs]
        logger.warning(f"{path}: {len(fresh)} tensors not in the checkpoint, freshly initialised: {short_list(fresh)}")
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise UserError(f"{path}: tensor for {name} holds {tensor.dtype} values, {arch} expects floating point")
    result = model.load_state_dict(ours, strict=False)
    leftover = set(result.missing_keys) - tied_aliases(model) - {r.ours for r in missing}
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    return model


def dequantized(tensors: dict[str, torch.Tensor], quantization: dict, where: str) -> dict[str, torch.Tensor]:
    """`tensors` of a compressed-tensors checkpoint (one scheme, e.g. what `llm convert --to hf` writes of
    a quantized model) with each compressed weight decompressed to float32 by the package's own compressor.

    Raises UserError naming `where` for another quantization method, several schemes, or a missing package."""
    method = quantization.get("quant_method")
    if method != "compressed-tensors":
        raise UserError(f"{where}: quantization_config: llm reads compressed-tensors checkpoints, not {method!r}")
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise UserError(f"{where}: a compressed-tensors checkpoint: pip install compressed-tensors") from None
    config = QuantizationConfig.model_validate(quantization)
    if len(config.config_groups) != 1:
        raise UserError(f"{where}: quantization_config has {len(config.config_groups)} schemes; llm reads one")
    scheme = next(iter(config.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
    parts = compressor.compression_param_names(scheme)
    out = dict(tensors)
    for module in [k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")]:
        local = {p: out.pop(f"{module}.{p}") for p in parts if f"{module}.{p}" in out}
        out[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    return out


# Trunk tensors a checkpoint may lack (transformers initialises them): the masked-image-modeling token.
OPTIONAL = {"transformer.mask_token"}


def hf_architecture(model: Model) -> str:
    """The Hugging Face architecture `model` exports as. Raises UserError naming the task, transform
    or config field that Hugging Face cannot express."""
    cfg, task = model.config, task_of(model)
    arch = task.hf_architecture(cfg)
    if arch is None:
        raise UserError(f"task {task.name!r} of a {cfg.family!r} model has no Hugging Face architecture")
    if model.transforms:
        names = ", ".join(t["name"] for t in model.transforms)
        raise UserError(f"the model carries transforms ({names}); merge or remove them before a Hugging Face export")
    hf.family_adapter(cfg.family).check_exportable(cfg, arch)
    return arch


def hf_state_dict(model: Model) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, state dict with Hugging Face names) for `model`; tied tensors appear once.

    Raises UserError naming the task or field that Hugging Face cannot express."""
    arch = hf_architecture(model)
    cfg = model.config
    prefix, rules = hf_rules(cfg, task_of(model))
    ours = model.state_dict()
    out = {}
    for rule in rules:
        for name, tensor in zip(rule.theirs, hf.to_theirs(rule, ours[rule.ours], cfg)):
            out[(prefix if rule.base else "") + name] = tensor.detach().to("cpu").contiguous().clone()
    return arch, out


def to_hf(
    model: Model,
    path: str | Path,
    tokenizer: str | Path | None = None,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    quantization_config: dict | None = None,
) -> Path:
    """A Hugging Face directory that `transformers` loads as it is: config.json,
    model.safetensors, generation_config.json (causal LMs) and, given `tokenizer` (a
    tokenizer.json or its folder), tokenizer.json, tokenizer_config.json (with the task's chat
    template: an instruction model's) and special_tokens_map.json. bos/eos/pad ids the model config
    leaves unset are taken from the tokenizer, so generation stops at its EOS. The directory replaces
    an earlier one whole (`llm.fileio.replace_dir`: readers see the old or the new). Returns `path`.

    `tensors` (with `quantization_config`, config.json's) are written in place of the model's own
    Hugging Face tensors: a quantized model's compressed form of them (`llm.run.formats.compressed_tensors`).

    Raises UserError naming the field or task Hugging Face cannot express, an instruction model
    given no tokenizer (its template lives in the tokenizer's files), or when `path` is a folder of
    other files."""
    from safetensors.torch import save_file

    from llm.data.tokenizer import Tokenizer

    path = Path(path)
    arch, dense = hf_state_dict(model)
    tensors = dense if tensors is None else tensors
    cfg = model.config
    adapter = hf.family_adapter(cfg.family)
    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and not cfg.is_image:
        known = {"bos_token_id": tok.special_id("bos"), "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        if adapter.bos_is_eos and known["bos_token_id"] is None:
            known["bos_token_id"] = known["eos_token_id"]
        fill = {k: v for k, v in known.items() if getattr(cfg, k) is None and v is not None and v < cfg.vocab_size}
        cfg = dataclasses.replace(cfg, **fill)
    config = adapter.config_to_hf(cfg, arch)
    config.update(task_of(model).hf_config(cfg))
    dtype = next(model.parameters()).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    eos = tok.tokenizer.id_to_token(cfg.eos_ids[0]) if tok is not None and cfg.eos_ids else None
    chat_template = task_of(model).hf_chat_template(eos)
    with replace_dir(path, replaces=("config.json", "config.yaml")) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.task in ("causal_lm", "instruction"):
            generation = {k: v for k, v in hf.special_tokens(cfg).items() if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tok is not None:
            tok.save_hf(tmp, None if cfg.is_image else cfg.max_seq_len, chat_template)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
