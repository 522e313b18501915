"""Image classification reads an .npz array file or an image folder directly (no shards)."""

from __future__ import annotations

import numpy as np

from llm.data.config import DataConfig
from llm.tasks import build_model, get_task

VIT = dict(family="vit", image_size=8, patch_size=4, num_channels=1, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def all_samples(task, cfg, path):
    batches = task.batches(
        cfg, DataConfig(train=str(path), val=str(path)), "val", seed=0, micro_batch_size=5, rank=0, world_size=1
    )
    out = []
    while (batch := batches.next_batch()) is not None:
        assert batch["pixel_values"].shape[1:] == (1, 8, 8)
        for pixels, label in zip(batch["pixel_values"], batch["labels"]):
            out.append((int(label), round(float(pixels.sum()), 3)))
    return sorted(out)


def test_an_npz_file_gives_labels_and_every_image_once(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    labels = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    task = get_task("image_classification").with_data(DataConfig(train=str(tmp_path / "d.npz")))
    assert task.options.labels == ["0", "1", "2"] and task.options.num_labels == 3
    model = build_model(VIT, task)
    want = sorted((int(y), round(float((x.astype(np.float32) / 127.5 - 1).sum()), 3)) for x, y in zip(images, labels))
    got = all_samples(task, model.config, tmp_path / "d.npz")
    assert [y for y, _ in got] == [y for y, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-2)


def test_an_image_folder_names_its_classes(tmp_path):
    from PIL import Image

    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    task = get_task("image_classification").with_data(DataConfig(train=str(tmp_path / "imgs")))
    assert task.options.labels == ["cat", "dog"]
    samples = all_samples(task, build_model(VIT, task).config, tmp_path / "imgs")
    assert [label for label, _ in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0][1] < 0 < samples[-1][1]  # dark cats, bright dogs


def test_image_shards_label_each_image_with_the_models_row_of_its_class(tmp_path):
    """Shards number the classes as their manifest lists them (cat, dog); a model whose rows are
    dog, cat reads a cat as its row 1, by name."""
    from PIL import Image

    from llm.data.images import prepare_images

    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    prepare_images(tmp_path / "imgs", tmp_path / "shards", size=8, channels=1)
    task = get_task({"name": "image_classification", "num_labels": 2, "labels": ["dog", "cat"]})
    samples = all_samples(task, build_model(VIT, task).config, tmp_path / "shards" / "train")
    assert [label for label, _ in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0][1] > 0 > samples[-1][1]  # dogs (row 0) bright, cats (row 1) dark
