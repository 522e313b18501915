"""Collators: samples (or a stacked tensor) -> the keyword arguments of a model's forward.

Random collators take `generator=`; StatefulLoader passes one seeded by the batch's global
position, so a resumed run masks and augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from llm.kernels.reference import IGNORE_INDEX, document_bounds


def collate_causal_lm(batch) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> input_ids and labels shifted by one (both seq_len long)."""
    windows = batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int64: the document of each position of packed rows whose documents end with `eos_id`
    (an EOS belongs to the document it ends; the next token starts a new one)."""
    ends = (input_ids == eos_id).long()
    return ends.cumsum(1) - ends


class PackedDocuments:
    """`collate_causal_lm` for packed windows whose documents end with EOS (as `llm data prepare` writes
    them), with each document kept apart: `document_ids` (attention stays inside a document),
    `position_ids` from 0 at each document's first token, and no target at an EOS (the next document's
    first token is not predicted from the document before it; every document keeps its own targets,
    its EOS included). So each document gets the logits and loss terms it gets alone, as with Hugging
    Face's DataCollatorWithFlattening; a document cut by the window's start counts from its first token
    in the window."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        out = collate_causal_lm(batch)
        ids = out["input_ids"]
        docs = document_ids(ids, self.eos_id)
        start, _ = document_bounds(docs)
        out["position_ids"] = torch.arange(ids.shape[1]) - start
        out["labels"] = out["labels"].masked_fill(ids == self.eos_id, IGNORE_INDEX)
        out["document_ids"] = docs
        return out


def _pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


class MLMCollator:
    """BERT masking: each non-special token is chosen with probability `mlm_probability`; a chosen
    token becomes [MASK] 80% of the time, a random token 10%, stays 10%; labels are the original
    ids at chosen positions and -100 elsewhere. Samples are token tensors (one sequence each) or
    SentencePairs dicts, which become [CLS] A [SEP] B [SEP] with token_type_ids and
    next_sentence_label. Output matches MaskedLM.forward."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15):
        ids = {k: tokenizer.special_id(k) for k in ("mask", "pad", "cls", "sep")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"{tokenizer.path}: MLM needs special tokens {missing} (train a wordpiece tokenizer)")
        self.mask_id, self.pad_id, self.cls_id, self.sep_id = ids["mask"], ids["pad"], ids["cls"], ids["sep"]
        self.special = torch.tensor(sorted(set(tokenizer.special_ids) | set(ids.values())))
        self.vocab_size = tokenizer.vocab_size
        self.mlm_probability = mlm_probability

    def __call__(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = {}
        if isinstance(batch[0], dict):
            rows, types = [], []
            cls, sep = torch.tensor([self.cls_id]), torch.tensor([self.sep_id])
            for s in batch:
                rows.append(torch.cat([cls, s["a"], sep, s["b"], sep]))
                types.append(torch.cat([torch.zeros(len(s["a"]) + 2), torch.ones(len(s["b"]) + 1)]).long())
            ids, mask = _pad(rows, self.pad_id)
            out["token_type_ids"] = _pad(types, 0)[0]
            out["next_sentence_label"] = torch.tensor([s["next_sentence_label"] for s in batch])
        else:
            ids, mask = _pad(list(batch), self.pad_id)
        input_ids, labels = self.mask(ids, mask, generator)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, **out}

    def mask(self, ids: torch.Tensor, attention_mask: torch.Tensor, generator=None):
        candidates = (attention_mask == 1) & ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=generator) < self.mlm_probability) & candidates
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        roll = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator)
        out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
        return out, labels


class ContrastiveTextCollator:
    """SpanPairs -> a batch of 2B sequences: rows i and B + i are two spans of one document;
    labels = arange(B) (the other rows are the in-batch negatives). Matches Contrastive.forward."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        ids, mask = _pad([s["a"] for s in batch] + [s["b"] for s in batch], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(len(batch))}


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in [-1, 1] (mean 0.5, std 0.5 per channel, as ViT)."""
    return pixels.float().div(127.5).sub(1.0)


def collate_images(batch) -> dict[str, torch.Tensor]:
    """ImageStream samples -> pixel_values (B, C, H, W) float and labels (for ImageClassifier)."""
    return {
        "pixel_values": normalize_pixels(torch.stack([s["pixels"] for s in batch])),
        "labels": torch.tensor([s["label"] for s in batch], dtype=torch.int64),
    }


class MaskedImageCollator:
    """SimMIM masking: exactly round(mask_ratio * patches) random patches per image are masked
    (bool_masked_pos (B, patches), True = masked). Matches MaskedImageModel.forward."""

    def __init__(self, image_size: int, patch_size: int, mask_ratio: float = 0.6):
        if image_size % patch_size or not 0 < mask_ratio < 1:
            raise ValueError(f"bad masked-image settings: image {image_size}, patch {patch_size}, ratio {mask_ratio}")
        self.num_patches = (image_size // patch_size) ** 2
        self.num_masked = max(1, round(mask_ratio * self.num_patches))

    def __call__(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        pixels = normalize_pixels(torch.stack([s["pixels"] for s in batch]))
        scores = torch.rand(len(batch), self.num_patches, generator=generator)
        masked = scores.argsort(dim=1)[:, : self.num_masked]
        bool_masked_pos = torch.zeros(len(batch), self.num_patches, dtype=torch.bool)
        bool_masked_pos.scatter_(1, masked, True)
        return {"pixel_values": pixels, "bool_masked_pos": bool_masked_pos}


class ContrastiveImageCollator:
    """Two augmentations of each image (a random crop of `crop` of the side, resized back, and a
    random horizontal flip): rows i and B + i are views of image i; labels = arange(B)."""

    def __init__(self, crop: float = 0.75):
        self.crop = crop

    def augment(self, image: torch.Tensor, generator) -> torch.Tensor:
        _, h, w = image.shape
        ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
        top = int(torch.randint(h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(w - cw + 1, (1,), generator=generator))
        view = image[None, :, top : top + ch, left : left + cw]
        view = torch.nn.functional.interpolate(view, size=(h, w), mode="bilinear", align_corners=False)[0]
        if torch.rand(1, generator=generator) < 0.5:
            view = view.flip(-1)
        return view

    def __call__(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = normalize_pixels(torch.stack([s["pixels"] for s in batch]))
        first = [self.augment(x, generator) for x in images]
        second = [self.augment(x, generator) for x in images]
        return {"pixel_values": torch.stack(first + second), "labels": torch.arange(len(batch))}


class PadCollator:
    """Examples of different lengths -> one batch padded on the right to its longest example
    (never packed into each other). Samples hold "input_ids" (T,) int64 and either "label"
    (an int: classification) or "labels" (T,) int64 (per token; padding gets IGNORE_INDEX)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        ids, mask = _pad([s["input_ids"] for s in batch], self.pad_id)
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in batch[0]:
            out["labels"] = _pad([s["labels"] for s in batch], IGNORE_INDEX)[0]
        else:
            out["labels"] = torch.tensor([s["label"] for s in batch], dtype=torch.int64)
        return out
