"""Images from scikit-learn's bundled digits: a PNG folder and an .npz give the same shards,
the stream partitions ranks and resumes, MIM and contrastive collators fit their models."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from llm.data import (
    ContrastiveImageCollator,
    ImageStream,
    MaskedImageCollator,
    StatefulLoader,
    collate_images,
    prepare_images,
    verify,
)
from llm.errors import UserError
from tests.conftest import build


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    images = (data.images[:300] * (255 / 16)).round().astype(np.uint8)
    labels = data.target[:300]
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "png" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    np.savez(root / "digits.npz", images=images, labels=labels)
    return root, images, labels


def test_folder_and_array_file_agree(digits, tmp_path):
    root, images, labels = digits
    a = prepare_images(root / "png", tmp_path / "a", size=8, channels=1, shard_images=64)
    b = prepare_images(root / "digits.npz", tmp_path / "b", size=8, channels=1, shard_images=64)
    assert a["train"] == b["train"] == 300
    verify(tmp_path / "a" / "train")
    ds = ImageStream(tmp_path / "b" / "train")
    got = {tuple(s["pixels"].flatten().tolist()): s["label"] for s in ds}
    assert got == {tuple(x.flatten().tolist()): int(y) for x, y in zip(images, labels)}
    folder = ImageStream(tmp_path / "a" / "train")
    assert sorted(got) == sorted(tuple(s["pixels"].flatten().tolist()) for s in folder)


def test_stream_partitions_and_resumes(digits, tmp_path):
    root, _, _ = digits
    prepare_images(root / "digits.npz", tmp_path / "d", size=16, channels=3, shard_images=100)
    seen = []
    for rank in range(2):
        loader = StatefulLoader(
            ImageStream(tmp_path / "d" / "train", seed=4, rank=rank, world_size=2), 10, collate_images
        )
        seen += [tuple(p.flatten()[:40].tolist()) for b in loader for p in b["pixel_values"]]
    assert len(seen) == 300
    full = [b for b in StatefulLoader(ImageStream(tmp_path / "d" / "train", seed=4), 10, collate_images)]
    loader = StatefulLoader(ImageStream(tmp_path / "d" / "train", seed=4), 10, collate_images, num_workers=2)
    head = [b for _, b in zip(range(4), loader)]
    again = StatefulLoader(ImageStream(tmp_path / "d" / "train", seed=4), 10, collate_images)
    again.load_state_dict(loader.state_dict())
    for want, got in zip(full, head + list(again), strict=True):
        assert torch.equal(want["pixel_values"], got["pixel_values"]) and torch.equal(want["labels"], got["labels"])


def test_masked_image_and_contrastive_batches_fit_models(digits, tmp_path):
    root, _, _ = digits
    prepare_images(root / "digits.npz", tmp_path / "d", size=16, channels=3)
    samples = ImageStream(tmp_path / "d" / "train").samples_at(list(range(8)))
    vit = dict(
        family="vit",
        image_size=16,
        patch_size=4,
        num_channels=3,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        causal=False,
        vocab_size=1,
        max_seq_len=17,
    )
    mim = MaskedImageCollator(16, 4, mask_ratio=0.5)(samples, generator=torch.Generator().manual_seed(0))
    assert mim["bool_masked_pos"].shape == (8, 16) and (mim["bool_masked_pos"].sum(1) == 8).all()
    assert mim["pixel_values"].min() >= -1 and mim["pixel_values"].max() <= 1
    assert torch.isfinite(build({**vit, "task": "masked_image_modeling"})(**mim).loss)
    pairs = ContrastiveImageCollator()(samples, generator=torch.Generator().manual_seed(0))
    assert pairs["pixel_values"].shape == (16, 3, 16, 16) and torch.equal(pairs["labels"], torch.arange(8))
    assert not torch.equal(pairs["pixel_values"][:8], pairs["pixel_values"][8:])
    assert torch.isfinite(build({**vit, "task": "contrastive"})(**pairs).loss)


def test_bad_image_inputs(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="x.png: cannot read image"):
        prepare_images(tmp_path / "imgs", tmp_path / "out", size=8)
    np.savez(tmp_path / "f.npz", images=np.zeros((3, 4, 4), dtype=np.float32), labels=np.zeros(3))
    with pytest.raises(UserError, match="f.npz: 'images' must be uint8"):
        prepare_images(tmp_path / "f.npz", tmp_path / "out", size=8)
    with pytest.raises(UserError, match="nothing.npz: no such file"):
        prepare_images(tmp_path / "nothing.npz", tmp_path / "out", size=8)
