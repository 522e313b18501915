"""Hugging Face interop of the trunk: one adapter per model family.

Each family's module holds all that Hugging Face knows of it (`FamilyAdapter`): the model
types and architectures it answers to, where its trunk sits inside a head model, its weight
rules, config.json both ways, the checks an export must pass, and its tokenizer's quirks.
gpt2.py is GPT-2; llama.py LLaMA, Mistral, Qwen2 and Qwen3; bert.py BERT; vit.py ViT. Heads
are the tasks' (`Task.hf_head_rules`); `llm.tasks.hf` joins the two. Adding a family is one
module here and its line in `ADAPTERS`. Nothing here imports transformers.
"""

from __future__ import annotations

from llm.errors import UserError
from llm.models.hf.base import ClassifierHead, FamilyAdapter, special_tokens
from llm.models.hf.bert import Bert
from llm.models.hf.files import copy_tokenizer, read_chat_template, read_hf_config, read_hf_weights
from llm.models.hf.gpt2 import GPT2
from llm.models.hf.llama import Llama
from llm.models.hf.rules import Rule, fused_rules, linear_rules, to_ours, to_theirs
from llm.models.hf.vit import ViT

ADAPTERS: dict[str, FamilyAdapter] = {a.family: a for a in (GPT2(), Llama(), Bert(), ViT())}
MODEL_TYPES: dict[str, FamilyAdapter] = {kind: a for a in ADAPTERS.values() for kind in a.model_types}


def family_adapter(family: str) -> FamilyAdapter:
    """The adapter of our ModelConfig.family `family`."""
    return ADAPTERS[family]


def architectures() -> dict[str, tuple[FamilyAdapter, str, dict]]:
    """Every Hugging Face architecture llm reads: name -> (family adapter, task name, task options it implies)."""
    return {arch: (a, task, implied) for a in ADAPTERS.values() for arch, (task, implied) in a.architectures.items()}


def architecture_of(config: dict, where: str) -> str:
    """The architecture a config.json names (its first "architectures" entry, else its model_type's
    default). Raises UserError naming `where` for one llm does not read."""
    archs = config.get("architectures") or []
    if archs:
        arch = archs[0]
    else:
        kind = config.get("model_type")
        if kind not in MODEL_TYPES:
            raise UserError(f"{where}: model_type {kind!r} is not supported")
        arch = MODEL_TYPES[kind].model_types[kind]
    if arch not in architectures():
        raise UserError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(architectures())})")
    return arch


__all__ = [
    "ADAPTERS",
    "ClassifierHead",
    "FamilyAdapter",
    "Rule",
    "architecture_of",
    "architectures",
    "copy_tokenizer",
    "family_adapter",
    "fused_rules",
    "linear_rules",
    "read_chat_template",
    "read_hf_config",
    "read_hf_weights",
    "special_tokens",
    "to_ours",
    "to_theirs",
]
