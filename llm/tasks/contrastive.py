"""Contrastive embeddings: InfoNCE on pooled, L2-normalised vectors with in-batch
negatives (van den Oord et al., 2018; SimCSE / SimCLR style pairs).

A batch of 2B sequences (or images) holds B pairs: row i and row B + i are two
views of one sample. `logits` is the (B, B) similarity matrix over the
temperature; `labels[i]` is the index of row i's positive among the second
halves (normally arange(B)). The loss is symmetric over both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.kernels.reference import upcast
from llm.models.base import Model, pool
from llm.models.config import ModelConfig
from llm.models.transformer import ModelOutput
from llm.tasks.base import Task


@dataclasses.dataclass
class ContrastiveOptions:
    temperature: float = 0.05
    pooling: Literal["first", "mean", "last"] = "mean"

    def validate(self, path: str = "task") -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature", f"must be > 0, got {self.temperature}")


class Contrastive(Model):
    task = "contrastive"

    def __init__(self, cfg: ModelConfig, options: ContrastiveOptions | None = None):
        super().__init__(cfg, options or ContrastiveOptions())
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None) -> ModelOutput:
        h = self.transformer(input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        emb = F.normalize(upcast(pool(h, attention_mask, self.options.pooling)), dim=-1)
        if emb.shape[0] % 2:
            raise ValueError(f"a contrastive batch holds pairs; got an odd batch of {emb.shape[0]}")
        a, b = emb.chunk(2)
        logits = a @ b.t() / self.options.temperature
        loss = None
        if labels is not None:
            inverse = torch.empty_like(labels)
            inverse[labels] = torch.arange(labels.numel(), device=labels.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), inverse)) / 2
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=emb)


class ContrastiveTask(Task):
    name = "contrastive"
    model_class = Contrastive
    Options = ContrastiveOptions
    min_micro_batch = 2  # in-batch negatives need another pair

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm import data as D

        if cfg.is_image:
            return D.ImageStream(path, seed, rank, world_size), D.ContrastiveImageCollator()
        D.check_vocab(path, cfg.vocab_size)
        tok = self.tokenizer(data, "contrastive text batches are padded with the tokenizer's pad or eos token")
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        return D.SpanPairs(path, data.seq_len, seed, rank, world_size), D.ContrastiveTextCollator(pad or 0)

    def synthetic_batch(self, corpus, indices, cfg, seq_len):
        """Two views of each sample (10% of tokens, or pixel noise, changed): rows i and B + i."""
        from llm.data.synthetic import FIRST_TOKEN

        views = ([], [])
        for i in indices:
            for v in range(2):
                g = corpus.generator(i * 2 + v + 13)
                if cfg.is_image:
                    img = corpus.image(i)
                    views[v].append(img + 0.1 * torch.randn(img.shape, generator=g))
                else:
                    text = corpus.text(i, seq_len)
                    noise = torch.randint(FIRST_TOKEN, cfg.vocab_size, text.shape, generator=g)
                    views[v].append(torch.where(torch.rand(text.shape, generator=g) < 0.1, noise, text))
        key = "pixel_values" if cfg.is_image else "input_ids"
        return {key: torch.stack(views[0] + views[1]), "labels": torch.arange(len(indices))}
