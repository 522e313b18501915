"""Images: a folder (one subfolder per class) or an .npz array file -> fixed-size uint8 pixel
shards with labels, and `ImageStream`, which reads them in the same global order as text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from llm.data import shards as S
from llm.data.prepare import is_validation
from llm.data.stream import Stream
from llm.errors import UserError

# pixels of one input image at most (8192 x 8192: above any photograph a training set shrinks; below
# Pillow's own warning at 89 M): a header claiming more is refused before anything is decoded
MAX_PIXELS = 1 << 26
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _resize(image, size: int, channels: int) -> np.ndarray:
    """A PIL image -> (C, size, size) uint8."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _folder_images(folder: Path, size: int, channels: int):
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder}: expected one subfolder per class, found none")
    yield classes
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.is_file())
        if not files:
            raise UserError(f"{folder / name}: class folder holds no images")
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
            try:
                with Image.open(path) as image:  # reads the header only: the pixels are decoded on use
                    if image.width * image.height > MAX_PIXELS:
                        raise UserError(
                            f"{path}: {image.width}x{image.height} pixels, more than llm decodes ({MAX_PIXELS:,})"
                        )
                    yield _resize(image, size, channels), label
            except Image.DecompressionBombError as e:  # Pillow's own bound, checked when the header is read
                raise UserError(f"{path}: {e}") from None
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"{path}: cannot read image ({e})") from None


def _array_images(path: Path, size: int, channels: int):
    from PIL import Image

    try:
        arrays = np.load(path)
        images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: expected an .npz with arrays 'images' (N,H,W[,C]) and 'labels' (N,) ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise UserError(
            f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C) with one label each; got {images.dtype} "
            f"{images.shape} and {len(labels)} labels"
        )
    classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    yield classes
    for image, label in zip(images, labels):
        yield _resize(Image.fromarray(image.squeeze()), size, channels), int(label)


def read_images(source: str | Path, size: int, channels: int) -> tuple[list[str], list[dict]]:
    """(class names, samples {"pixels": uint8 (C, size, size), "label": int}) of a folder with one
    subfolder per class or an .npz file, read into memory (no shards): small sets for fine-tuning."""
    source = Path(source)
    if source.is_dir():
        items = _folder_images(source, size, channels)
    elif source.is_file():
        items = _array_images(source, size, channels)
    else:
        raise UserError(f"{source}: no such file or directory")
    classes = next(items)
    samples = [{"pixels": torch.from_numpy(np.array(p)), "label": label} for p, label in items]
    if not samples:
        raise UserError(f"{source}: holds no images")
    return classes, samples


def prepare_images(
    source: str | Path,
    out_dir: str | Path,
    size: int,
    channels: int = 3,
    val_fraction: float = 0.0,
    shard_images: int = 10_000,
) -> dict:
    """Write out_dir/train (and out_dir/val) image shards; the split is by a hash of the pixels."""
    source, out = Path(source), Path(out_dir)
    if size < 1 or channels not in (1, 3) or shard_images < 1 or not 0 <= val_fraction < 1:
        raise UserError(
            f"prepare_images: bad size={size}, channels={channels}, shard_images={shard_images} "
            f"or val_fraction={val_fraction}"
        )
    if source.is_dir():
        items = _folder_images(source, size, channels)
    elif source.is_file():
        items = _array_images(source, size, channels)
    else:
        raise UserError(f"{source}: no such file or directory")
    classes = next(items)
    splits = ["train"] + (["val"] if val_fraction > 0 else [])
    buffers = {s: [] for s in splits}
    entries = {s: [] for s in splits}
    with S.staged(*[out / s for s in splits]) as stages:  # the old dataset stays until this succeeds
        dirs = dict(zip(splits, stages))

        def flush(split: str) -> None:
            images = buffers[split]
            if not images:
                return
            pixels = np.stack([p for p, _ in images]).reshape(len(images), -1)
            column = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), pixels.shape[1])
            labels = pa.array(np.array([label for _, label in images], dtype=np.int32))
            entry = S.write_shard(
                dirs[split],
                len(entries[split]),
                pa.RecordBatch.from_arrays([column, labels], names=["pixels", "label"]),
            )
            entry["num_images"] = entry.pop("rows")
            entries[split].append(entry)
            buffers[split] = []

        for pixels, label in items:
            h = hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()
            split = "val" if val_fraction > 0 and is_validation(h, val_fraction) else "train"
            buffers[split].append((pixels, label))
            if len(buffers[split]) >= shard_images:
                flush(split)
        summary = {"out_dir": str(out)}
        for split in splits:
            flush(split)
            if not entries[split]:
                raise UserError(f"{out / split}: no images to write (empty source {source} or val_fraction too small)")
            manifest = {
                "format": S.FORMAT,
                "format_version": S.FORMAT_VERSION,
                "kind": "images",
                "image_shape": [channels, size, size],
                "classes": classes,
                "num_images": sum(e["num_images"] for e in entries[split]),
                "source": str(source.resolve()),
                "shards": entries[split],
            }
            S.write_manifest(dirs[split], manifest)
            summary[split] = manifest["num_images"]
    return summary


class ImageStream(Stream):
    """Images of a shard directory in the global order; each sample is
    {"pixels": uint8 (C, H, W), "label": int}."""

    def __init__(self, path: str | Path, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.manifest = S.load_manifest(path, kind="images")
        self.map_files()
        self.bounds = np.cumsum([0] + [len(p) for p in self.pixels])
        super().__init__(int(self.bounds[-1]), seed, rank, world_size, name=str(self.path))

    MAPPED = ("pixels", "labels")

    def map_files(self) -> None:
        columns = [S.image_columns(self.path / s["file"], s, self.manifest) for s in self.manifest["shards"]]
        self.pixels = [c[0] for c in columns]
        self.labels = [c[1] for c in columns]

    def sample_at(self, position: int) -> dict:
        index = self.index_at(position)
        shard = int(np.searchsorted(self.bounds, index, side="right")) - 1
        local = index - int(self.bounds[shard])
        return {
            "pixels": torch.from_numpy(np.array(self.pixels[shard][local])),
            "label": int(self.labels[shard][local]),
        }
