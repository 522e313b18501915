"""Micro-batches from shard directories through llm.data's readers and collators, per objective."""

from __future__ import annotations

from pathlib import Path

import torch

from llm.config import RecipeConfig
from llm.errors import UserError
from llm.train.batches import tokens_in


class ShardSource:
    """This rank's micro-batches of one split. The training split wraps into the next epoch;
    the validation split ends (next_batch returns None) after one pass."""

    def __init__(self, recipe: RecipeConfig, path: Path, rank: int, world_size: int, split: str = "train"):
        from llm import data as D

        cfg, data = recipe.model, recipe.data
        self.model, self.wrap = cfg, split == "train"
        seed, seq = recipe.seed, data.seq_len
        if not Path(path).exists():
            raise UserError(f"data.{split}: {path}: shard directory not found (run `llm data prepare`)")
        if cfg.is_image:
            stream = D.ImageStream(path, seed, rank, world_size)
            if cfg.task == "masked_image_modeling":
                collate = D.MaskedImageCollator(cfg.image_size, cfg.patch_size, data.mask_ratio)
            elif cfg.task == "contrastive":
                collate = D.ContrastiveImageCollator()
            else:
                collate = D.collate_images
        else:
            D.check_vocab(path, cfg.vocab_size)
            if cfg.task == "causal_lm":
                stream, collate = D.PackedTokens(path, seq, seed, rank, world_size), D.collate_causal_lm
            elif cfg.task in ("pretraining", "masked_lm"):
                tok = self._tokenizer(recipe)
                if cfg.task == "pretraining":
                    stream = D.SentencePairs(path, seq, seed, rank, world_size)
                else:
                    stream = D.PackedTokens(path, seq - 1, seed, rank, world_size)
                collate = D.MLMCollator(tok, data.mlm_probability)
            elif cfg.task == "contrastive":
                tok = self._tokenizer(recipe)
                pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
                stream, collate = D.SpanPairs(path, seq, seed, rank, world_size), D.ContrastiveTextCollator(pad or 0)
            else:
                raise UserError(f"model.task: {cfg.task!r} has no pretraining data pipeline")
        self.loader = D.StatefulLoader(stream, recipe.train.micro_batch_size, collate, data.num_workers)
        self._iter = None

    @staticmethod
    def _tokenizer(recipe: RecipeConfig):
        from llm.data import Tokenizer

        if recipe.data.tokenizer is None:
            raise UserError(f"data.tokenizer: task {recipe.model.task!r} needs the tokenizer's special tokens")
        return Tokenizer(recipe.data.tokenizer)

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = None
            if not self.wrap:
                return None
            self._iter = iter(self.loader)
            return next(self._iter)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return tokens_in(batch, self.model)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None
