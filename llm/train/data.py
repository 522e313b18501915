"""Batch sources for the trainer: synthetic, or the Arrow shards of `llm data prepare`."""

from __future__ import annotations

import sys
from pathlib import Path

from llm.config import RecipeConfig
from llm.errors import UserError
from llm.train.batches import SyntheticSource


def make_source(recipe: RecipeConfig, rank: int, world_size: int, split: str):
    """The train or val source for this rank (None when the recipe has no validation split)."""
    data = recipe.data
    if data.source == "synthetic":
        return SyntheticSource(recipe, rank, world_size, split)
    path = data.train if split == "train" else data.val
    if path is None:
        return None
    from llm.train.shards import ShardSource

    return ShardSource(recipe, Path(path), rank, world_size, split)


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
        print(
            f"llm: training a {prep.tokenizer_kind} tokenizer ({prep.vocab_size} tokens) on the stdlib corpus",
            file=sys.stderr,
            flush=True,
        )
        made = llm_data.train_tokenizer(
            sources, tokenizer.parent, kind=prep.tokenizer_kind, vocab_size=prep.vocab_size, special_tokens=None
        )
        if Path(made) != tokenizer and Path(made).is_file():
            tokenizer = Path(made)
    print(f"llm: preparing shards in {out_dir}", file=sys.stderr, flush=True)
    llm_data.prepare(sources, tokenizer, out_dir, shard_tokens=prep.shard_tokens, val_fraction=prep.val_fraction)
    if not train_dir.exists():
        raise UserError(f"data.train: {train_dir} was not produced by preparation (expected {out_dir}/train)")
    print(f"llm: data ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
