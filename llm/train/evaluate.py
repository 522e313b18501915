"""`llm eval`: loss and perplexity of a model (a checkpoint or a model directory) on a token shard directory."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llm.errors import UserError
from llm.train import checkpoint as ckpt


def load_any_model(path: str | Path):
    """A run's checkpoints/ dir or step dir (any ZeRO stage), else an llm/Hugging Face model directory."""
    path = Path(path)
    if (path / ckpt.LATEST).is_file() or (path / ckpt.COMPLETE).is_file() or list(path.glob("step_*")):
        return ckpt.load_model_from_checkpoint(path)
    try:
        from llm.models.io import load_model
    except ImportError:
        raise UserError(f"{path}: not a checkpoint, and llm.models.io is not available to read a model dir") from None
    return load_model(path)


@torch.no_grad()
def evaluate_model(
    model_path: str | Path, data: str | Path, seq_len: int | None = None, batch_size: int = 8, max_batches=None
) -> dict:
    """Mean next-token loss over the windows of a shard directory (one pass, in order) and its perplexity."""
    from llm.data import PackedTokens, check_vocab, collate_causal_lm, make_loader

    model = load_any_model(model_path)
    cfg = model.config
    if cfg.task != "causal_lm":
        raise UserError(f"{model_path}: llm eval measures causal LM loss; this model's task is {cfg.task!r}")
    check_vocab(data, cfg.vocab_size)
    seq = seq_len or cfg.max_seq_len
    loader = make_loader(PackedTokens(data, seq, seed=0), batch_size, collate_causal_lm)
    model.eval()
    total, tokens, batches = 0.0, 0, 0
    for batch in loader:
        out = model(batch["input_ids"], labels=batch["labels"], return_logits=False)
        n = batch["labels"].numel()
        total += out.loss.double().item() * n
        tokens += n
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens, "batches": batches}
