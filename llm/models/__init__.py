"""Models: one configurable Transformer trunk that every task's head sits on.

`ModelConfig` chooses the architecture; `Model` is the base of every task
model (llm.tasks builds them: `llm.tasks.build_model(cfg, task)`); the trunk,
its layers, KV-cache generation, sizing and the trunk's Hugging Face mapping
live here. Nothing here knows tasks, data, the engine or the command line.
"""

from __future__ import annotations

from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.transformer import KVCache, ModelOutput

__all__ = ["KVCache", "Model", "ModelConfig", "ModelOutput"]
