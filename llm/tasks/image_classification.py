"""Image classification (ViT): a linear layer on the final [CLS] state (Dosovitskiy et al., 2021)."""

from __future__ import annotations

import dataclasses

from torch import nn

from llm.config import ConfigError, ModelConfig
from llm.models.base import Model
from llm.models.hf import linear_rules
from llm.models.transformer import ModelOutput
from llm.tasks.classification import ClassificationTask, classification_loss


@dataclasses.dataclass
class ImageClassificationOptions:
    num_labels: int = 2
    labels: list[str] | None = None  # class names, index order

    def validate(self, path: str = "task") -> None:
        if self.num_labels < 2:
            raise ConfigError(f"{path}.num_labels", f"must be >= 2, got {self.num_labels}")


class ImageClassifier(Model):
    """pixel_values (B, C, H, W) float -> logits (B, num_labels)."""

    task = "image_classification"

    def __init__(self, cfg: ModelConfig, options: ImageClassificationOptions | None = None):
        options = options or ImageClassificationOptions()
        super().__init__(cfg, options)
        self.classifier = nn.Linear(cfg.d_model, options.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, interpolate_pos_encoding: bool = False) -> ModelOutput:
        h = self.transformer(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.classifier(h[:, 0])
        return ModelOutput(logits=logits, loss=classification_loss(logits, labels), hidden_states=h, pooled=h[:, 0])


class ImageClassificationTask(ClassificationTask):
    name = "image_classification"
    model_class = ImageClassifier
    Options = ImageClassificationOptions
    families = ("vit",)
    hf_architectures = {"ViTForImageClassification": ("vit", {})}

    def check(self, cfg, path="model"):
        super().check(cfg, path)
        self.check_labels("task")

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import ImageStream, collate_images

        return ImageStream(path, seed, rank, world_size), collate_images

    def hf_head_rules(self, cfg):
        return linear_rules("classifier", "classifier", base=False)
