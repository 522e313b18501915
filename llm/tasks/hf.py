"""Whole models to and from Hugging Face directories: the trunk's rules (llm.models.hf)
joined with the head rules of the task that answers to the architecture."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.config import ConfigError, ModelConfig, build_config
from llm.errors import UserError
from llm.models import hf
from llm.models.base import Model, tied_aliases
from llm.tasks import TASKS, get_task, task_of
from llm.tasks.base import Task

# The architecture a config.json without "architectures" stands for.
DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel", "vit": "ViTModel"}


def architectures() -> dict[str, tuple[type[Task], str, dict]]:
    """Every Hugging Face architecture llm reads: name -> (task class, family, task options)."""
    return {
        arch: (task, family, options)
        for task in TASKS.values()
        for arch, (family, options) in task.hf_architectures.items()
    }


def _architecture(config: dict, file: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else DEFAULT_ARCHITECTURE.get(config.get("model_type", ""))
    if arch is None:
        raise UserError(f"{file}: model_type {config.get('model_type')!r} is not supported")
    known = architectures()
    if arch not in known:
        raise UserError(f"{file}: architecture {arch!r} is not supported (supported: {', '.join(known)})")
    return arch


def _rules(cfg: ModelConfig, task: Task) -> list[hf.Rule]:
    return hf.trunk_rules(cfg, mask_token=task.mask_token) + task.hf_head_rules(cfg)


def from_hf(path: str | Path, task: str | dict | None = None) -> Model:
    """The model in a Hugging Face directory (config.json + safetensors or pytorch_model.bin).

    `task` builds another head on the same trunk (e.g. "text_classification"
    from a BertModel): the trunk must be complete, missing head weights are freshly
    initialised and unused ones dropped. Without it every tensor must match.
    Raises UserError naming the file for an unsupported architecture or field,
    missing, extra or misshapen tensors.
    """
    path = Path(path)
    config = hf.read_hf_config(path)
    file = path / "config.json"
    arch = _architecture(config, file)
    arch_task, family, implied = architectures()[arch]
    fields = hf.config_from_hf(config, family, str(file))
    for name in ("eos_token_id", "pad_token_id"):
        value = config.get(name)
        if isinstance(value, list):  # some configs list several EOS ids; the first is the one we stop at
            value = value[0] if value else None
        if family != "vit" and isinstance(value, int) and 0 <= value < fields["vocab_size"]:
            fields[name] = value

    prefix = hf.BASE_PREFIX[family] if arch_task.nested else ""
    weights = {}
    for key, tensor in hf.read_hf_weights(path).items():
        key = key.removeprefix(prefix).replace("LayerNorm.gamma", "LayerNorm.weight")
        weights[key.replace("LayerNorm.beta", "LayerNorm.bias")] = tensor
    fields["pooler"] = "pooler.dense.weight" in weights
    try:
        cfg = build_config(ModelConfig, fields, "model")
        source_task = arch_task({**implied, **arch_task({}, "task").hf_options(config)})
        target = source_task if task is None else get_task(task)
        model = target.build_model(cfg)
    except ConfigError as e:
        raise UserError(f"{file}: {e}") from None

    lenient = task is not None and target.to_dict() != source_task.to_dict()
    ours, used, missing = {}, set(), []
    for rule in _rules(cfg, target):
        if all(t in weights for t in rule.theirs):
            ours[rule.ours] = hf.to_ours(rule, [weights[t] for t in rule.theirs])
            used.update(rule.theirs)
        else:
            missing.append(rule)
    bad_missing = [r for r in missing if not lenient or r.ours.startswith("transformer.")]
    if bad_missing:
        names = [t for r in bad_missing[:4] for t in r.theirs if t not in weights]
        raise UserError(f"{path}: weights for {arch} lack {', '.join(names)} ({len(bad_missing)} tensors missing)")
    ignored = source_task.hf_ignored(cfg)
    unused = [k for k in weights if k not in used and not k.endswith(hf.IGNORED_SUFFIXES) and k not in ignored]
    if unused and not lenient:
        raise UserError(f"{path}: {len(unused)} tensors that {arch} does not have, e.g. {', '.join(unused[:4])}")
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    result = model.load_state_dict(ours, strict=False)
    leftover = set(result.missing_keys) - tied_aliases(model) - {r.ours for r in missing}
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    return model


def hf_state_dict(model: Model) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture, state dict with Hugging Face names) for `model`; tied tensors appear once.

    Raises UserError naming the task or field that Hugging Face cannot express."""
    cfg, task = model.config, task_of(model)
    arch = task.hf_architecture(cfg)
    if arch is None:
        raise UserError(f"task {task.name!r} of a {cfg.family!r} model has no Hugging Face architecture")
    if model.transforms:
        names = ", ".join(t["name"] for t in model.transforms)
        raise UserError(f"the model carries transforms ({names}); merge or remove them before a Hugging Face export")
    hf.check_exportable(cfg, arch)
    prefix = hf.BASE_PREFIX[cfg.family] if task.nested else ""
    ours = model.state_dict()
    out = {}
    for rule in _rules(cfg, task):
        for name, tensor in zip(rule.theirs, hf.to_theirs(rule, ours[rule.ours], cfg)):
            out[(prefix if rule.base else "") + name] = tensor.detach().to("cpu").contiguous().clone()
    return arch, out


def to_hf(model: Model, path: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write config.json + model.safetensors that `transformers` loads with from_pretrained;
    copy `tokenizer` (a tokenizer.json) beside them when given. Returns `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    arch, tensors = hf_state_dict(model)
    config = hf.config_to_hf(model.config, arch)
    config.update(task_of(model).hf_config(model.config))
    dtype = next(model.parameters()).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    from llm.fileio import write_atomic

    tmp = path / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    write_atomic(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        hf.copy_tokenizer(tokenizer, path)
    return path
