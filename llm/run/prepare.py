"""The quickstart's first run: a tokenizer and Arrow shards made from the recipe's `data.prepare`."""

from __future__ import annotations

from pathlib import Path

from llm.errors import UserError
from llm.log import logger
from llm.run.recipe import RecipeConfig


def prepare_if_missing(recipe: RecipeConfig, rank: int) -> None:
    """Build tokenizer and shards from `data.prepare` when `data.train` does not exist (rank 0; others wait)."""
    data = recipe.data
    if data.source != "shards" or data.prepare is None or Path(data.train).exists():
        return
    import torch.distributed as dist

    if rank == 0:
        prepare_corpus(recipe)
    if dist.is_initialized():
        dist.barrier()


def prepare_corpus(recipe: RecipeConfig) -> None:
    import time

    from llm import data as llm_data

    data, prep = recipe.data, recipe.data.prepare
    if data.tokenizer is None:
        raise UserError("data.tokenizer: needed to prepare shards (where the tokenizer is written or read)")
    train_dir = Path(data.train)
    out_dir = train_dir.parent
    if data.val is not None and Path(data.val).parent != out_dir:
        raise UserError(f"data.val: must sit beside data.train ({out_dir}) to be prepared with it")
    start = time.perf_counter()
    sources = [str(p) for p in llm_data.stdlib_files(prep.limit_bytes)]
    tokenizer = Path(data.tokenizer)
    if not tokenizer.is_file():
        logger.info(f"training a {prep.tokenizer_kind} tokenizer ({prep.vocab_size} tokens) on the stdlib corpus")
        made = llm_data.train_tokenizer(
            sources, tokenizer.parent, kind=prep.tokenizer_kind, vocab_size=prep.vocab_size, special_tokens=None
        )
        if Path(made) != tokenizer and Path(made).is_file():
            tokenizer = Path(made)
    logger.info(f"preparing shards in {out_dir}")
    llm_data.prepare(sources, tokenizer, out_dir, shard_tokens=prep.shard_tokens, val_fraction=prep.val_fraction)
    if not train_dir.exists():
        raise UserError(f"data.train: {train_dir} was not produced by preparation (expected {out_dir}/train)")
    logger.info(f"data ready in {time.perf_counter() - start:.1f} s")
