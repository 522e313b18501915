"""Masked image modeling (SimMIM, Xie et al., 2022): a learned mask token replaces
the masked patches, a linear decoder predicts every patch's pixels, and the L1
loss counts the masked patches' pixels only (as Hugging Face's
ViTForMaskedImageModeling)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ConfigError
from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.hf import linear_rules
from llm.models.transformer import ModelOutput
from llm.tasks.base import Task


@dataclasses.dataclass
class MaskedImageOptions:
    mask_ratio: float = 0.6  # share of patches masked

    def validate(self, path: str = "task") -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{path}.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")


class MaskedImageModel(Model):
    """pixel_values (B, C, H, W) and bool_masked_pos (B, patches) -> reconstruction (B, C, H, W), L1 loss."""

    task = "masked_image_modeling"

    def __init__(self, cfg: ModelConfig, options: MaskedImageOptions | None = None):
        super().__init__(cfg, options or MaskedImageOptions(), mask_token=True)
        self.decoder = nn.Linear(cfg.d_model, cfg.patch_size**2 * cfg.num_channels)
        self.post_init()

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """Patch predictions (B, N, C*p*p) -> image (B, C, H, W); channel-major within a patch."""
        cfg = self.config
        b, p, c = h.shape[0], cfg.patch_size, cfg.num_channels
        side = cfg.image_size // p
        x = self.decoder(h[:, 1:]).view(b, side, side, c, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, side * p, side * p)

    def forward(self, pixel_values, bool_masked_pos=None) -> ModelOutput:
        h = self.transformer(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
        logits = self.reconstruct(h)
        loss = None
        if bool_masked_pos is not None:
            p, side = self.config.patch_size, self.config.image_size // self.config.patch_size
            mask = bool_masked_pos.reshape(-1, 1, side, side).to(logits.dtype)
            mask = mask.repeat_interleave(p, 2).repeat_interleave(p, 3)
            l1 = F.l1_loss(pixel_values.to(logits.dtype), logits, reduction="none")
            loss = (l1 * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


class MaskedImageModelingTask(Task):
    name = "masked_image_modeling"
    model_class = MaskedImageModel
    Options = MaskedImageOptions
    families = ("vit",)

    @property
    def mask_token(self) -> bool:
        return True

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import ImageStream, MaskedImageCollator

        collate = MaskedImageCollator(cfg.image_size, cfg.patch_size, self.options.mask_ratio)
        return ImageStream(path, seed, rank, world_size), collate

    def synthetic_batch(self, corpus, indices, cfg, seq_len):
        pixels = torch.stack([corpus.image(i) for i in indices])
        n, masks = cfg.num_patches, []
        for i in indices:
            order = torch.randperm(n, generator=corpus.generator(i + 7))
            m = torch.zeros(n, dtype=torch.bool)
            m[order[: max(1, int(n * self.options.mask_ratio))]] = True
            masks.append(m)
        return {"pixel_values": pixels, "bool_masked_pos": torch.stack(masks)}

    def loss_tokens(self, batch):
        """The L1 loss is a mean over masked patches."""
        return int(batch["bool_masked_pos"].sum())

    def hf_head_rules(self, cfg):
        return linear_rules("decoder", "decoder.0", op="conv1x1", base=False)
