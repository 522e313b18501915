"""`llm model info`: size, FLOPs and memory per rank of a model config, built on the meta device."""

from __future__ import annotations

import torch

from llm.models.config import load_model_config
from llm.models.info import format_model_info
from llm.tasks import build_model
from llm.train.parallel import Mesh, ParallelConfig, check_model


def model_info(
    config: str,
    *,
    task: str | None = None,
    ranks: int = 8,
    seq_len: int | None = None,
    micro_batch: int = 1,
    sequence: int = 1,
    tensor: int = 1,
    set: list[str] | None = None,
) -> str:
    """Parameters, training FLOPs per token, and memory per rank of a model config: ZeRO's model states and
    the activations of a micro-batch, with sequence and tensor parallelism.

    The model is built on the meta device: nothing is allocated.

    Args:
        config: a model YAML, or a preset name (gpt2-124m, llama-8b, bert-base, vit-base, ...)
        task: the head (default: causal_lm for text, masked_lm for encoders, image_classification for ViT)
        ranks: all ranks (data x sequence x tensor); ZeRO shards over ranks / tensor
        seq_len: sequence length for FLOPs and activations (default: the model's max_seq_len)
        micro_batch: sequences per micro-batch, for activations
        sequence: sequence-parallel ranks (parallel.sequence): each holds seq_len / sequence positions
        tensor: tensor-parallel ranks (parallel.tensor): each holds 1 / tensor of every block's linear layers
        set: override fields, KEY=VALUE (several pairs per flag, and the flag repeated)

    Example:
        llm model info llama-8b --ranks 64
        llm model info llama-8b --ranks 64 --sequence 8 --seq-len 131072
    """
    cfg = load_model_config(config, set)
    parallel = ParallelConfig(sequence=sequence, tensor=tensor)
    parallel.validate()
    Mesh.of(parallel, ranks)
    check_model(parallel, cfg)
    task = task or ("image_classification" if cfg.is_image else "causal_lm" if cfg.causal else "masked_lm")
    with torch.device("meta"):
        model = build_model(cfg, task)
    report = format_model_info(model, ranks, seq_len, micro_batch, sequence, tensor)
    print(report)
    return report
