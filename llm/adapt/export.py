"""Adapted models for other tools: a plain (merged) model, LoRA in PEFT's layout, and llm's own
adapter layout for prefix and prompt tuning.

- `plain(model)`: a copy without transforms: LoRA merged into the weights, prefix or
  soft prompt removed, transform records dropped. It exports to Hugging Face like
  any model (`llm.tasks.hf.to_hf` refuses models that carry transforms).
- `peft_lora(model, rules, ...)`: adapter_config.json fields and adapter_model.safetensors
  tensors in the layout of Hugging Face PEFT 0.21 (`base_model.model.<module>.lora_A.weight`),
  for `peft.PeftModel.from_pretrained(untouched_base, dir)`. Our layers map to the
  Hugging Face modules through the same `Rule`s as the weights (llm.models.hf, the
  task's head rules): a fused qkv or gate+up layer adapted as a whole gives each
  Hugging Face projection the shared A and its rows of B; adapted per slice (q, v)
  each projection gets its own pair. GPT-2's single c_attn (a Conv1D, hence
  `fan_in_fan_out`) takes per-slice adapters as one block-structured pair of rank
  slices x r, with `rank_pattern`/`alpha_pattern` keeping alpha / r. Whole modules
  trained beside the adapters (a new classifier) go to `modules_to_save`.
- `virtual_adapter(model)` / `load_virtual_adapter(model, dir)`: prefix and prompt
  tuning in llm's layout (PEFT's prompt-learning layouts differ in positions and
  GQA sizing, and cannot be merged either): adapter_config.json
  {"format": "llm-adapter", "version": 1, "transforms": [records]} and
  adapter_model.safetensors with the `transformer.prefix.*` or `transformer.prompt.*`
  tensors. Loading applies the records to the plain model, then the tensors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from llm.adapt import ADAPTERS, apply_transforms, lora, prefix
from llm.errors import UserError
from llm.fileio import load_safetensors, replace_dir
from llm.models.base import Model
from llm.models.fit import dry_run, meta_copy
from llm.models.hf import Rule, to_theirs

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
VIRTUAL = ("prefix", "prompt")
VIRTUAL_TENSORS = ("transformer.prefix.", "transformer.prompt.")
PEFT_TASK = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


def plain(model: Model) -> Model:
    """A copy of a whole (not ZeRO-3 partitioned) `model` with no transforms; see the module docstring."""
    out = copy.deepcopy(model)
    if lora.adapted_layers(out):
        lora.merge(out)
    out.transformer.prefix = None
    out.transformer.prompt = None
    out.transforms = []
    return out


def has_lora(model: Model) -> bool:
    return bool(lora.adapted_layers(model))


def has_virtual_tokens(model: Model) -> bool:
    return model.transformer.prefix is not None or model.transformer.prompt is not None


# ----------------------------------------------------------------------------
# LoRA in PEFT's layout
# ----------------------------------------------------------------------------


def _module(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def peft_lora(
    model: Model,
    rules: list[Rule],
    base_prefix: str,
    architecture: str,
    base_model: str | None = None,
    tied: dict[str, tuple[str, ...]] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter tensors) for the LoRA layers of whole `model`.

    `rules` map our tensors to the Hugging Face ones of `architecture` (trunk and head);
    rules with `base` sit under `base_prefix` ("transformer." for GPT2LMHeadModel). `tied`: our
    tensor -> the Hugging Face tensors transformers ties to it (`Task.hf_tied`); a trained tensor
    is saved under those names too, with PEFT's `ensure_weight_tying`, since PEFT's copy of a saved
    module leaves the base's tied twin as it was (peft#2399). Raises UserError naming what PEFT
    cannot hold: a layer without a Hugging Face counterpart, a slice layout it cannot express, a
    module both adapted and trained in full, or a trained tensor outside every rule (a prefix)."""
    by_ours = {r.ours: r for r in rules}
    cfg = model.config
    hf_name = lambda rule, theirs: (base_prefix if rule.base else "") + _module(theirs)
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    settings: dict | None = None
    fan_in_fan_out = False
    save = lambda name, t: tensors.__setitem__(
        f"base_model.model.{name}", t.detach().float().cpu().clone().contiguous()
    )
    for name, layer in lora.adapted_layers(model):
        rule = by_ours.get(f"{name}.weight")
        if rule is None:
            raise UserError(f"LoRA on {name}: {architecture} has no counterpart for it, so PEFT cannot load it")
        settings = settings or {"r": layer.lora_rank, "lora_alpha": layer.lora_alpha}
        pairs = {key: (rows, a, b) for key, rows, a, b in layer.lora_pairs()}
        if rule.op == "cat":
            sizes = [t.shape[0] for t in to_theirs(rule, layer.weight.detach(), cfg)]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            slice_names = list(lora.slices_of(model, name))
            for i, theirs in enumerate(rule.theirs):
                module = hf_name(rule, theirs)
                if "" in pairs:  # the whole fused layer: shared A, B's rows of this projection
                    _, a, b = pairs[""]
                    a, b = a, b[starts[i] : starts[i] + sizes[i]]
                elif i < len(slice_names) and slice_names[i] in pairs:
                    _, a, b = pairs[slice_names[i]]
                else:
                    continue
                targets.append(module)
                save(f"{module}.lora_A.weight", a)
                save(f"{module}.lora_B.weight", b)
            continue
        module = hf_name(rule, rule.theirs[0])
        fan_in_fan_out |= rule.op == "t"
        targets.append(module)
        if list(pairs) == [""]:
            _, a, b = pairs[""]
            save(f"{module}.lora_A.weight", a)
            save(f"{module}.lora_B.weight", b)
            continue
        # slices of one fused Hugging Face layer: one pair of rank S*r, B block-structured by rows
        out_rows, r = layer.weight.shape[0], layer.lora_rank
        big_a = torch.cat([a.float() for _, a, _ in pairs.values()], dim=0)
        big_b = torch.zeros(out_rows, r * len(pairs))
        for j, ((start, end), _, b) in enumerate(pairs.values()):
            big_b[start:end, j * r : (j + 1) * r] = b.float()
        save(f"{module}.lora_A.weight", big_a)
        save(f"{module}.lora_B.weight", big_b)
        rank_pattern[module] = r * len(pairs)
        alpha_pattern[module] = layer.lora_alpha * len(pairs)
    if settings is None:
        raise UserError("the model has no LoRA adapter to export")
    # modules trained in full (PEFT's modules_to_save), each saved whole: every Hugging Face tensor in it
    theirs: dict[str, torch.Tensor] = {}  # Hugging Face name -> tensor, of the whole model
    owner: dict[str, str] = {}  # Hugging Face name -> our tensor
    state, tied = model.state_dict(), tied or {}
    for rule in rules:
        prefix = base_prefix if rule.base else ""
        for name, tensor in zip(rule.theirs, to_theirs(rule, state[rule.ours], cfg)):
            theirs[prefix + name], owner[prefix + name] = tensor, rule.ours
        for twin in tied.get(rule.ours, ()):  # outside the trunk prefix
            theirs[twin], owner[twin] = state[rule.ours], rule.ours
    head_task = next((t for suffix, t in PEFT_TASK.items() if architecture.endswith(suffix)), None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    heads = {r.ours for r in rules if head_task == "SEQ_CLS" and not r.base}  # a new classifier: always saved
    saved = list(dict.fromkeys(_module(name) for name, ours in owner.items() if ours in trained | heads))
    saved = [m for m in saved if not any(m.startswith(other + ".") for other in saved)]  # the outermost
    lost = trained - set(owner.values())
    if lost:
        raise UserError(f"PEFT's LoRA adapter cannot hold {', '.join(sorted(lost))}, trained beside the adapters")
    for module in saved:
        adapted = [t for t in targets if t == module or t.startswith(module + ".")]
        if adapted:
            raise UserError(f"{adapted[0]} is both adapted by LoRA and trained in full; PEFT cannot hold both")
        for name, tensor in theirs.items():
            if name.startswith(module + "."):
                save(name, tensor)
    twins = {f"base_model.model.{twin}" for names in tied.values() for twin in names}
    config = {
        "peft_type": "LORA",
        "task_type": head_task or ("FEATURE_EXTRACTION" if architecture.endswith("Model") else None),
        "base_model_name_or_path": base_model,
        **settings,
        "lora_dropout": _dropout(model),
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": saved or None,
        "ensure_weight_tying": bool(twins & set(tensors)),  # PEFT keeps a saved tied embedding tied
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    return config, tensors


def _dropout(model: Model) -> float:
    for _, layer in lora.adapted_layers(model):
        return float(getattr(layer.lora_dropout, "p", 0.0))
    return 0.0


# ----------------------------------------------------------------------------
# Prefix and prompt tuning in llm's layout
# ----------------------------------------------------------------------------


def virtual_adapter(model: Model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a whole model's prefix or soft prompt, a reparameterized
    prefix folded first (on a copy). Raises UserError when the model has neither."""
    if not has_virtual_tokens(model):
        raise UserError("the model has no prefix or soft prompt to export")
    model = prefix.fold(copy.deepcopy(model))
    records = [dict(t) for t in model.transforms if t["name"] in VIRTUAL]
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(VIRTUAL_TENSORS)}
    config = {"format": "llm-adapter", "version": 1, "transforms": records}
    return config, tensors


def write_adapter(path: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter_config.json + adapter_model.safetensors as directory `path`, replacing an earlier one
    whole (`llm.fileio.replace_dir`)."""
    from safetensors.torch import save_file

    with replace_dir(path, replaces=(ADAPTER_CONFIG,)) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    """The adapter_config.json of adapter directory `path`. Raises UserError naming the file when it is
    missing or not a JSON object."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object")
    return config


def is_virtual_adapter(path: str | Path) -> bool:
    """Whether directory `path` holds an adapter in llm's layout (a prefix or soft prompt), not PEFT's.
    Raises UserError naming the file when its adapter_config.json cannot be read."""
    return read_adapter_config(path).get("format") == "llm-adapter"


def load_virtual_adapter(model: Model, path: str | Path) -> Model:
    """Put the prefix or soft prompt saved in llm's layout at `path` on `model` (its plain base).

    The directory is checked against what an adapter may hold before anything is allocated (a dry
    run on a meta copy of the model, `llm.models.fit`): adapter_config.json names prefix and prompt
    transforms only (no LoRA, which export merges or writes in PEFT's layout; no pruning or
    quantization), whose sizes its base bounds, and adapter_model.safetensors holds exactly their
    tensors, in their shapes. Raises UserError naming the file and field otherwise."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    config = read_adapter_config(path)
    if config.get("format") != "llm-adapter":
        raise UserError(f"{file}: not an llm adapter (a PEFT adapter loads with peft.PeftModel.from_pretrained)")
    records = config.get("transforms") or []
    if not isinstance(records, list):
        raise UserError(f"{file}: transforms: expected a list of transforms")
    tensors = load_safetensors(path / ADAPTER_WEIGHTS)

    def load(base: Model, values: dict) -> Model:
        adapted = apply_transforms(base, records, f"{file}: transforms", {n: ADAPTERS[n] for n in VIRTUAL})
        own = {k: v for k, v in adapted.state_dict().items() if k.startswith(VIRTUAL_TENSORS)}
        if set(own) != set(values) or any(own[k].shape != values[k].shape for k in own):
            shapes = lambda d: {k: tuple(v.shape) for k, v in sorted(d.items())}
            raise UserError(f"{path / ADAPTER_WEIGHTS}: tensors {shapes(values)} do not fit the adapter {shapes(own)}")
        if not all(v.is_floating_point() for v in values.values()):
            raise UserError(f"{path / ADAPTER_WEIGHTS}: expected floating-point tensors")
        adapted.load_state_dict(values, strict=False)
        return adapted

    dry_run(lambda: meta_copy(model), load, tensors, str(file))
    return load(model, tensors)
