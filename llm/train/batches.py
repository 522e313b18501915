"""Micro-batches for each objective, with a position that resumes exactly.

Every source follows the data pipeline's contract: samples have one global order,
interleaved across ranks (rank r takes global samples r, r + W, r + 2W, ...), and
the position is the number of samples consumed in that order plus the epoch. A
single rank with micro batch m x W therefore sees exactly the samples W ranks see
with micro batch m, so runs on different rank counts compare step for step.
"""

from __future__ import annotations

import torch

from llm.config import ModelConfig, RecipeConfig

# Ids the synthetic text reserves; real tokens start after them.
PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_TOKEN = 4
IGNORE_INDEX = -100
BRANCHES = 4  # the synthetic language continues each token in one of 4 ways


class SyntheticSource:
    """Reproducible random batches with structure a model can learn (losses fall).

    Text follows a random sparse bigram table (each token has 4 possible successors),
    images are a per-image colour plus a smooth low-frequency pattern. Sample g is drawn from a generator seeded
    with (seed, g), so any rank can produce any sample and resuming is exact.
    """

    def __init__(self, recipe: RecipeConfig, rank: int, world_size: int, split: str = "train"):
        self.model: ModelConfig = recipe.model
        self.seq_len = recipe.data.seq_len
        self.micro = recipe.train.micro_batch_size
        self.mlm_probability = recipe.data.mlm_probability
        self.mask_ratio = recipe.data.mask_ratio
        self.rank, self.world_size = rank, world_size
        self.seed = recipe.seed + (0 if split == "train" else 1_000_003)
        self.consumed = 0  # samples consumed in the global order
        vocab = self.model.vocab_size
        table_gen = torch.Generator().manual_seed(recipe.seed)
        self.table = torch.randint(FIRST_TOKEN, max(vocab, FIRST_TOKEN + 1), (vocab, BRANCHES), generator=table_gen)

    # -- position -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": 0, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def _indices(self, n: int) -> list[int]:
        start = self.consumed
        self.consumed += n * self.world_size
        return [start + k * self.world_size + self.rank for k in range(n)]

    def _gen(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_000_007 + index)

    # -- samples ------------------------------------------------------------------------

    def _text(self, index: int, length: int) -> torch.Tensor:
        g = self._gen(index)
        first = torch.randint(FIRST_TOKEN, self.model.vocab_size, (1,), generator=g)
        choice = torch.randint(0, BRANCHES, (length,), generator=g)
        out = torch.empty(length, dtype=torch.long)
        out[0] = first
        for t in range(1, length):
            out[t] = self.table[out[t - 1], choice[t]]
        return out

    def _image(self, index: int) -> torch.Tensor:
        g = self._gen(index)
        cfg = self.model
        coarse = torch.randn(1, cfg.num_channels, 2, 2, generator=g) + 2 * torch.randn(
            1, cfg.num_channels, 1, 1, generator=g
        )
        size = (cfg.image_size, cfg.image_size)
        return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return tokens_in(batch, self.model)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch as model keyword arguments."""
        idx = self._indices(self.micro)
        task = self.model.task
        if task == "causal_lm":
            windows = torch.stack([self._text(i, self.seq_len + 1) for i in idx])
            return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
        if task in ("pretraining", "masked_lm"):
            return self._mlm_batch(idx)
        if task == "masked_image_modeling":
            pixels = torch.stack([self._image(i) for i in idx])
            n = self.model.num_patches
            masks = []
            for i in idx:
                g = self._gen(i + 7)
                order = torch.randperm(n, generator=g)
                m = torch.zeros(n, dtype=torch.bool)
                m[order[: max(1, int(n * self.mask_ratio))]] = True
                masks.append(m)
            return {"pixel_values": pixels, "bool_masked_pos": torch.stack(masks)}
        if task == "contrastive":
            return self._contrastive_batch(idx)
        raise ValueError(f"no synthetic data for task {task!r}")

    def _mlm_batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """[CLS] A [SEP] B [SEP]; B follows A (label 0) or comes from another sample (label 1)."""
        half = (self.seq_len - 3) // 2
        rows, types, labels, nsp = [], [], [], []
        for i in idx:
            g = self._gen(i + 11)
            text = self._text(i, 2 * half)
            a, b = text[:half], text[half:]
            is_random = bool(torch.rand((), generator=g) < 0.5)
            if is_random:
                b = self._text(i + 1_000_000_000, half)
            ids = torch.cat([torch.tensor([CLS]), a, torch.tensor([SEP]), b, torch.tensor([SEP])])
            tt = torch.cat([torch.zeros(half + 2, dtype=torch.long), torch.ones(half + 1, dtype=torch.long)])
            special = (ids == CLS) | (ids == SEP)
            chosen = (torch.rand(ids.shape, generator=g) < self.mlm_probability) & ~special
            lab = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
            ids = torch.where(chosen, torch.full_like(ids, MASK), ids)
            rows.append(ids)
            types.append(tt)
            labels.append(lab)
            nsp.append(int(is_random))
        ids = torch.stack(rows)
        return {
            "input_ids": ids,
            "token_type_ids": torch.stack(types),
            "attention_mask": torch.ones_like(ids),
            "labels": torch.stack(labels),
            "next_sentence_label": torch.tensor(nsp),
        }

    def _contrastive_batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Two views of each sample (10% of tokens, or pixel noise, changed): rows i and B + i."""
        views = ([], [])
        for i in idx:
            for v in range(2):
                g = self._gen(i * 2 + v + 13)
                if self.model.is_image:
                    img = self._image(i)
                    views[v].append(img + 0.1 * torch.randn(img.shape, generator=g))
                else:
                    text = self._text(i, self.seq_len)
                    noise = torch.randint(FIRST_TOKEN, self.model.vocab_size, text.shape, generator=g)
                    views[v].append(torch.where(torch.rand(text.shape, generator=g) < 0.1, noise, text))
        key = "pixel_values" if self.model.is_image else "input_ids"
        return {key: torch.stack(views[0] + views[1]), "labels": torch.arange(len(idx))}


def tokens_in(batch: dict[str, torch.Tensor], cfg: ModelConfig) -> int:
    """Tokens (patches + [CLS] for images) the model processed in a micro-batch."""
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return batch["pixel_values"].shape[0] * cfg.seq_len
