"""Turn text (or images) into shard directories, once, on all cores.

Documents are read in order, tokenized in chunks by a process pool (results come back in
order, so the output is the same for any number of workers), filtered (exact duplicates,
a minimum length), split into train/val by a hash of the text, EOS-terminated and packed
into shards of about `shard_tokens` tokens.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llm.data import shards as S
from llm.data.sources import expand_sources, read_documents
from llm.data.tokenizer import Tokenizer
from llm.errors import UserError

CHUNK_BYTES = 1 << 18  # text per task sent to a worker (small enough to balance the pool)

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = Tokenizer(tokenizer_path)


PIECE_CHARS = 1 << 18  # a longer document is tokenized in pieces of about this many characters
_BOUNDARY = re.compile(r"(?<=\S)\s(?=\S)")


def split_text(text: str, limit: int | None = None) -> list[str]:
    """`text` in pieces of at most about `limit` characters, each cut just before a single whitespace
    character between two non-space ones, where a BPE or WordPiece pre-tokenizer splits anyway (so
    the pieces' tokens are the whole text's). A stretch of `limit` characters without such a place
    is cut at `limit` (the tokens at that one cut may differ from the whole text's)."""
    limit = limit or PIECE_CHARS
    pieces, start = [], 0
    while len(text) - start > limit:
        window_start = start + limit // 2
        cut = None
        for match in _BOUNDARY.finditer(text, window_start, start + limit):
            cut = match.start()
        cut = cut if cut is not None and cut > start else start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _encode(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text; a long one in bounded pieces, so memory stays bounded for any length
    (a tokenizer holds per-character state of its whole input: ~200x the text, 7.5 GB for one 50 MB line;
    with 256k-character pieces the peak is about 50 MB for any length)."""
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for i, ids in zip(short, _worker_tokenizer.encode_batch([texts[i] for i in short])):
        out[i] = np.asarray(ids, dtype=np.uint32)
    for i, text in enumerate(texts):
        if out[i] is None:
            parts = [
                np.asarray(_worker_tokenizer.encode_batch([piece])[0], dtype=np.uint32) for piece in split_text(text)
            ]
            out[i] = np.concatenate(parts)
    return out


def _tokenize_chunk(texts: list[str]) -> tuple[list[bytes], list[np.ndarray], int]:
    """(text hashes, token arrays, utf-8 bytes) of a chunk of documents."""
    hashes = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
    return hashes, _encode(texts), sum(len(t.encode("utf-8")) for t in texts)


def _chunks(files: list[Path], text_field: str) -> Iterator[list[str]]:
    chunk, size = [], 0
    for path in files:
        for text in read_documents(path, text_field):
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def is_validation(text_hash: bytes, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of the document's hash as a fraction of 2**64."""
    return int.from_bytes(text_hash[:8], "little") < val_fraction * 2.0**64


class _TokenShardWriter:
    def __init__(self, out_dir: Path, shard_tokens: int, dtype: str):
        self.out_dir, self.shard_tokens, self.dtype = out_dir, shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.entries: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        entry = S.write_shard(self.out_dir, len(self.entries), S.token_batch(self.buffer, self.dtype))
        entry.pop("rows")
        entry.update(
            num_documents=len(self.buffer),
            num_tokens=self.buffered,
            max_token_id=int(max(int(d.max()) for d in self.buffer)),
        )
        self.entries.append(entry)
        self.buffer, self.buffered = [], 0

    def close(self, common: dict) -> dict | None:
        self.flush()
        if not self.entries:
            return None
        manifest = {
            "format": S.FORMAT,
            "format_version": S.FORMAT_VERSION,
            "kind": "tokens",
            **common,
            "num_documents": sum(e["num_documents"] for e in self.entries),
            "num_tokens": sum(e["num_tokens"] for e in self.entries),
            "shards": self.entries,
        }
        S.write_manifest(self.out_dir, manifest)
        return manifest


def prepare(
    sources,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 1 << 26,
    val_fraction: float = 0.0,
    min_length: int = 1,
    dedup: bool = True,
    workers: int | None = None,
    text_field: str = "text",
    limit_bytes: int | None = None,
) -> dict:
    """Tokenize `sources` into out_dir/train (and out_dir/val when val_fraction > 0).

    Returns a summary: documents and tokens per split, documents dropped (duplicates, short),
    text bytes read, seconds and MB/s of tokenization.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if tok.eos_id is None:
        raise UserError(f"{tok.path}: the tokenizer has no end-of-text token (one of <|endoftext|>, </s>, [SEP])")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    if not 1 <= shard_tokens < 1 << 31:
        raise UserError(f"shard_tokens: expected 1 .. 2**31-1, got {shard_tokens}")
    if min_length < 0:
        raise UserError(f"min_length: expected >= 0, got {min_length}")
    workers = max(1, workers or os.cpu_count() or 1)
    out = Path(out_dir)
    files = expand_sources(sources, limit_bytes)
    total_bytes = sum(p.stat().st_size for p in files)
    dtype = S.token_dtype(tok.vocab_size)
    splits = ["train"] + (["val"] if val_fraction > 0 else [])
    with S.staged(*[out / split for split in splits]) as stages:  # the old dataset stays until this succeeds
        summary = _prepare_into(
            dict(zip(splits, stages)),
            files,
            total_bytes,
            tok,
            dtype,
            shard_tokens,
            val_fraction,
            min_length,
            dedup,
            workers,
            text_field,
        )
    if val_fraction == 0 and (out / "val").exists():  # a stale split from an earlier prepare must not outlive it
        shutil.rmtree(out / "val")
    summary["out_dir"] = str(out)
    return summary


def _prepare_into(
    dirs, files, total_bytes, tok, dtype, shard_tokens, val_fraction, min_length, dedup, workers, text_field
) -> dict:
    writers = {split: _TokenShardWriter(d, shard_tokens, dtype) for split, d in dirs.items()}
    eos = np.array([tok.eos_id], dtype=np.uint32)
    seen: set[bytes] = set()
    stats = {"documents_read": 0, "dropped_duplicates": 0, "dropped_short": 0, "text_bytes": 0}

    from tqdm import tqdm

    start = time.perf_counter()
    chunks = _chunks(files, text_field)
    if workers == 1:
        _init_worker(str(tok.path))
        results = map(_tokenize_chunk, chunks)
        pool = None
    else:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=(str(tok.path),))
        results = pool.imap(_tokenize_chunk, chunks)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None) as bar:
            for hashes, ids, nbytes in results:
                bar.update(nbytes)
                stats["text_bytes"] += nbytes
                for h, doc in zip(hashes, ids):
                    stats["documents_read"] += 1
                    if dedup:
                        if h in seen:
                            stats["dropped_duplicates"] += 1
                            continue
                        seen.add(h)
                    if len(doc) < max(min_length, 1):
                        stats["dropped_short"] += 1
                        continue
                    split = "val" if val_fraction > 0 and is_validation(h, val_fraction) else "train"
                    writers[split].add(np.concatenate([doc, eos]))
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    common = {
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer": {"path": str(tok.path.resolve()), "sha256": tok.sha256, "eos_id": tok.eos_id},
        "stats": {**stats, "min_length": min_length, "dedup": dedup, "val_fraction": val_fraction},
    }
    summary = {**stats, "seconds": seconds, "mb_per_s": stats["text_bytes"] / 1e6 / seconds}
    for split, writer in writers.items():
        manifest = writer.close(common)
        if manifest is None:
            if split == "train":
                raise UserError(
                    f"{dirs[split].parent / split}: no documents left to write (empty input or all filtered)"
                )
            raise UserError(
                f"{dirs[split].parent / split}: val_fraction={val_fraction} selected no documents; raise it"
            )
        summary[split] = {"documents": manifest["num_documents"], "tokens": manifest["num_tokens"]}
    return summary


def write_token_shards(
    out_dir: str | Path,
    documents,
    vocab_size: int,
    tokenizer_info: dict | None = None,
    shard_tokens: int = 1 << 26,
) -> dict:
    """Write already-tokenized documents (arrays of ids, EOS included) as a shard directory."""
    with S.staged(Path(out_dir)) as (stage,):
        writer = _TokenShardWriter(stage, shard_tokens, S.token_dtype(vocab_size))
        for doc in documents:
            writer.add(np.asarray(doc))
        info = tokenizer_info or {"path": None, "sha256": "none", "eos_id": None}
        manifest = writer.close({"dtype": writer.dtype, "vocab_size": vocab_size, "tokenizer": info, "stats": {}})
        if manifest is None:
            raise UserError(f"{out_dir}: no documents to write")
    return manifest
