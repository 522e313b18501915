"""`llm eval`: the validation metrics of a model (any path the loader reads) on a shard directory."""

from __future__ import annotations

from pathlib import Path

import torch

from llm.config import DataConfig
from llm.errors import UserError
from llm.run.loader import find_tokenizer, load_model
from llm.tasks import task_of


@torch.no_grad()
def evaluate_model(
    model_path: str | Path,
    data: str | Path,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches=None,
    dtype: str | None = None,
) -> dict:
    """One pass, in order, over the windows (or samples) of a shard directory: the task's metrics
    (mean loss and perplexity for language models), with the number of batches."""
    model = load_model(model_path, dtype=dtype).eval()
    task = task_of(model)
    cfg = model.config
    tokenizer = find_tokenizer(model_path)
    config = DataConfig(
        source="shards", val=str(data), seq_len=seq_len or cfg.max_seq_len, tokenizer=tokenizer and str(tokenizer)
    )
    try:
        batches = task.batches(cfg, config, "val", seed=0, micro_batch=batch_size, rank=0, world_size=1)
    except UserError as e:
        raise UserError(f"{model_path}: {e}") from None
    sums: dict[str, float] = {}
    count = 0
    while max_batches is None or count < max_batches:
        batch = batches.next_batch()
        if batch is None:
            break
        for key, value in task.eval_sums(batch, model(**batch)).items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
    if not count:
        raise UserError(f"{data}: no batches to evaluate")
    metrics = {k.removeprefix("val_"): v for k, v in task.eval_metrics(sums).items()}
    return {**metrics, "batches": count}
