"""`llm model info`: size, FLOPs and ZeRO memory of a model config, built on the meta device."""

from __future__ import annotations

import torch

from llm.models.config import load_model_config
from llm.models.info import format_model_info
from llm.tasks import build_model


def model_info(
    config: str, *, task: str | None = None, ranks: int = 8, seq_len: int | None = None, set: list[str] | None = None
) -> str:
    """Parameters, training FLOPs per token and ZeRO memory per rank of a model config.

    The model is built on the meta device: nothing is allocated.

    Args:
        config: a model YAML, or a preset name (gpt2-124m, llama-8b, bert-base, vit-base, ...)
        task: the head (default: causal_lm for text, masked_lm for encoders, image_classification for ViT)
        ranks: data-parallel ranks for the ZeRO memory table
        seq_len: sequence length for FLOPs (default: the model's max_seq_len)
        set: override fields, KEY=VALUE (several pairs per flag, and the flag repeated)

    Example:
        llm model info llama-8b --ranks 64
    """
    cfg = load_model_config(config, set)
    task = task or ("image_classification" if cfg.is_image else "causal_lm" if cfg.causal else "masked_lm")
    with torch.device("meta"):
        model = build_model(cfg, task)
    report = format_model_info(model, ranks=ranks, seq_len=seq_len)
    print(report)
    return report
