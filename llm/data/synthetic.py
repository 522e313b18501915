"""Synthetic samples with structure a model can learn, for tests, benchmarks and smoke runs.

Text follows a random sparse bigram table (each token has `BRANCHES` possible
successors); images are a per-image colour plus a smooth low-frequency pattern.
Sample g is drawn from a generator seeded with (seed, g), so any rank can produce
any sample and resuming is exact. `SyntheticBatches` hands out this rank's
micro-batches in the global order shared with the shard readers: rank r takes
global samples r, r + W, r + 2W, ..., and the position is the number of samples
consumed in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Ids the synthetic text reserves; real tokens start after them.
PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_TOKEN = 4
BRANCHES = 4


class SyntheticCorpus:
    """Reproducible text and images: `text(g, length)` and `image(g)` are sample g."""

    def __init__(self, vocab_size: int, seed: int, table_seed: int, image_size: int = 0, num_channels: int = 3):
        self.vocab_size, self.seed = vocab_size, seed
        self.image_size, self.num_channels = image_size, num_channels
        table_gen = torch.Generator().manual_seed(table_seed)
        self.table = torch.randint(
            FIRST_TOKEN, max(vocab_size, FIRST_TOKEN + 1), (vocab_size, BRANCHES), generator=table_gen
        )

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_000_007 + index)

    def text(self, index: int, length: int) -> torch.Tensor:
        """`length` token ids (int64) of sample `index`, following the bigram table."""
        g = self.generator(index)
        first = torch.randint(FIRST_TOKEN, self.vocab_size, (1,), generator=g)
        choice = torch.randint(0, BRANCHES, (length,), generator=g)
        out = torch.empty(length, dtype=torch.long)
        out[0] = first
        for t in range(1, length):
            out[t] = self.table[out[t - 1], choice[t]]
        return out

    def image(self, index: int) -> torch.Tensor:
        """Image `index` as float (channels, size, size), roughly zero-mean."""
        g = self.generator(index)
        c = self.num_channels
        coarse = torch.randn(1, c, 2, 2, generator=g) + 2 * torch.randn(1, c, 1, 1, generator=g)
        size = (self.image_size, self.image_size)
        return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]


class SyntheticBatches:
    """This rank's micro-batches: `make_batch(global sample indices)` for each next position."""

    def __init__(self, make_batch: Callable[[list[int]], dict], micro_batch_size: int, rank: int, world_size: int):
        self.make_batch, self.micro_batch_size = make_batch, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.consumed = 0  # samples consumed in the global order

    def state_dict(self) -> dict:
        return {"epoch": 0, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def rewind(self) -> None:
        self.consumed = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.consumed
        self.consumed += self.micro_batch_size * self.world_size
        return self.make_batch([start + k * self.world_size + self.rank for k in range(self.micro_batch_size)])
