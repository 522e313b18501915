"""Collators: a list of samples (or a stacked tensor) -> the keyword arguments of a model's forward."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate_causal_lm(batch) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> input_ids and labels shifted by one (both seq_len long)."""
    windows = batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
