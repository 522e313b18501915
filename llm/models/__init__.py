"""Models: one configurable Transformer stack under every task head.

`build_model(cfg)` makes the model for `cfg.task`; `from_hf(dir)` and
`to_hf(model, dir)` move weights to and from Hugging Face directories;
`save_pretrained` / `load_pretrained` write and read llm model directories, and
`load_model(path)` reads any of those or a training checkpoint.
"""

from __future__ import annotations

from llm.config import ModelConfig, build_config
from llm.models.heads import TASK_MODELS, Model
from llm.models.io import load_model, load_pretrained, save_pretrained
from llm.models.transformer import KVCache, ModelOutput

__all__ = [
    "KVCache",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "from_hf",
    "load_model",
    "load_pretrained",
    "save_pretrained",
    "to_hf",
]


def build_model(cfg: ModelConfig | dict) -> Model:
    """The model for `cfg.task`, freshly initialised."""
    if not isinstance(cfg, ModelConfig):
        cfg = build_config(ModelConfig, cfg, "model")
    return TASK_MODELS[cfg.task](cfg)


def from_hf(path, task: str | None = None) -> Model:
    """The model in a Hugging Face directory (GPT-2, LLaMA, BERT, ViT); `task` swaps the head."""
    from llm.models.hf import from_hf as _from_hf

    return _from_hf(path, task=task)


def to_hf(model: Model, path, tokenizer=None) -> None:
    """Write a Hugging Face directory (config.json + model.safetensors [+ tokenizer.json])."""
    from llm.models.hf import to_hf as _to_hf

    _to_hf(model, path, tokenizer=tokenizer)
