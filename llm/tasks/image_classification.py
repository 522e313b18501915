"""Image classification (ViT): a linear layer on the final [CLS] state (Dosovitskiy et al., 2021).

Data: image shards (`llm data prepare-images`), or, read into memory without shards, an .npz
file (uint8 `images` (N, H, W[, C]) and integer `labels`) or a folder with one subfolder per
class; images are resized to the model's image_size and num_channels.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.hf import linear_rules
from llm.models.transformer import ModelOutput
from llm.tasks.classification import ClassificationTask, LabelOptions, classification_loss


class ImageClassifier(Model):
    """pixel_values (B, C, H, W) float -> logits (B, num_labels)."""

    task = "image_classification"

    def __init__(self, cfg: ModelConfig, options: LabelOptions | None = None):
        options = options or LabelOptions()
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
    Options = LabelOptions
    families = ("vit",)

    def check(self, cfg, path="model"):
        super().check(cfg, path)
        self.check_labels("task")

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import ImageStream

        stream = ImageStream(path, seed, rank, world_size)
        return stream, ImagesWithRows(self.rows_of(list(stream.manifest["classes"]), path))

    def dataset_labels(self, data, path):
        return image_classes(path)

    def file_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import Examples, collate_images, read_images

        classes, samples = read_images(path, cfg.image_size, cfg.num_channels)
        rows = self.rows_of(classes, path)
        for sample in samples:
            sample["label"] = rows[sample["label"]]
        return Examples(samples, seed, rank, world_size, name=str(path)), collate_images

    def hf_head_rules(self, cfg):
        return linear_rules("classifier", "classifier", base=False)


class ImagesWithRows:
    """`collate_images` of image shards whose labels index the manifest's classes: each label becomes
    the model's row of that class (`rows`, from `ClassificationTask.rows_of`)."""

    def __init__(self, rows: list[int]):
        self.rows = torch.tensor(rows, dtype=torch.int64)

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        from llm.data import collate_images

        out = collate_images(batch)
        out["labels"] = self.rows[out["labels"]]
        return out


def image_classes(path) -> list[str] | None:
    """Class names of image data: a shard manifest's, a folder's subfolders, an .npz's label range."""
    from pathlib import Path

    import numpy as np

    from llm.data import load_manifest
    from llm.errors import UserError

    path = Path(path)
    if (path / "manifest.json").is_file():
        return list(load_manifest(path, kind="images")["classes"])
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if p.is_dir()) or None
    if path.suffix == ".npz" and path.is_file():
        try:
            labels = np.load(path)["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: expected an .npz with arrays 'images' and 'labels' ({e})") from None
        if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise UserError(f"{path}: 'labels' must be non-negative integers, got {labels.dtype} {labels[:5]}")
        return [str(c) for c in range(int(labels.max()) + 1)]
    return None
