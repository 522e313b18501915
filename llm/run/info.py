"""`llm model info`: size, FLOPs and ZeRO memory of a model config, built on the meta device."""

from __future__ import annotations

import torch

from llm.models.config import load_model_config
from llm.models.info import format_model_info
from llm.tasks import build_model


def model_info(
    config: str, overrides: list[str] | None = None, task: str | None = None, ranks: int = 8, seq_len: int | None = None
) -> str:
    """The report for a model YAML or preset name; `task` picks the head (default: causal_lm for
    text, image_classification for ViT)."""
    cfg = load_model_config(config, overrides)
    task = task or ("image_classification" if cfg.is_image else "causal_lm" if cfg.causal else "masked_lm")
    with torch.device("meta"):
        model = build_model(cfg, task)
    return format_model_info(model, ranks=ranks, seq_len=seq_len)
