"""Turn text (or images) into shard directories, once, on all cores.

Documents are read in order and tokenized in chunks of about 1 MB by the tokenizer's own
`encode_batch` (Rust, one thread per core, the GIL released) in a helper thread, while this
thread turns the previous chunk's ids into arrays, filters them (exact duplicates, a minimum
length), splits them into train/val by a hash of the text, EOS-terminates them and packs them
into shards of about `shard_tokens` tokens. Chunks come back in order, so the output is the
same for any number of threads. No process pool: pickling ids between processes cost more
than the tokenization it spread (`llm bench data` measures prepare against encode_batch alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llm.data import shards as S
from llm.data.sources import expand_sources, read_documents
from llm.data.tokenizer import Tokenizer, split_text
from llm.errors import UserError

CHUNK_BYTES = 1 << 20  # text per encode_batch call: enough documents to keep every core busy


@contextlib.contextmanager
def _parallelism(workers: int | None):
    """Let the tokenizer use its thread pool (or not, for workers=1) for the length of a prepare.
    `workers` > 1 also sizes that pool when it has not started yet in this process (RAYON_NUM_THREADS)."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers == 1 else "true"
    if workers and workers > 1 and saved["RAYON_NUM_THREADS"] is None:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


PIECE_CHARS = 1 << 18  # a longer document is tokenized in pieces of about this many characters


def _encode_next(chunks: Iterator[list[str]], tok: Tokenizer):
    """(texts, ids) of the next chunk, or None at the end. Runs in a helper thread: the tokenizer's
    Rust encode_batch releases the GIL and fans the documents out over its thread pool (one per core).
    A text longer than PIECE_CHARS is encoded piece by piece (`split_text`) into a uint32 array, so
    memory stays bounded for any length (a tokenizer holds per-character state of its whole input:
    ~200x the text, 7.5 GB for one 50 MB line; with 256k-character pieces the peak is about 50 MB)."""
    texts = next(chunks, None)
    if texts is None:
        return None
    tok.tokenizer.encode_special_tokens = True  # a document spelling "<|endoftext|>" is text: only prepare adds EOS
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)  # no offsets: faster
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    ids: list = [None] * len(texts)
    for i, encoding in zip(short, encode([texts[i] for i in short], add_special_tokens=False)):
        ids[i] = encoding.ids
    for i, text in enumerate(texts):
        if ids[i] is None:
            pieces = (encode([piece], add_special_tokens=False)[0].ids for piece in split_text(text, PIECE_CHARS))
            ids[i] = np.concatenate([np.asarray(piece, dtype=np.uint32) for piece in pieces])
    return texts, ids


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

    `workers`: tokenizer threads (None: one per core; 1: no threads, which the tokenizer also
    falls back to in a process forked after it used its pool). Returns a summary: documents
    and tokens per split, documents dropped (duplicates, short), text bytes read, seconds and
    MB/s of tokenization. The new splits are built aside and replace the old ones only when
    complete (`shards.staged`), so a failed or interrupted prepare leaves the old dataset as it was.
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
    seen: set[bytes] = set()
    stats = {"documents_read": 0, "dropped_duplicates": 0, "dropped_short": 0, "text_bytes": 0}

    from tqdm import tqdm

    start = time.perf_counter()
    chunks = _chunks(files, text_field)
    with _parallelism(workers), ThreadPoolExecutor(1, thread_name_prefix="llm-encode") as helper:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None) as bar:
            pending = helper.submit(_encode_next, chunks, tok)
            while (done := pending.result()) is not None:
                pending = helper.submit(_encode_next, chunks, tok)  # encode the next chunk meanwhile
                texts, token_ids = done
                nbytes = 0
                for text, ids in zip(texts, token_ids):
                    raw = text.encode("utf-8")
                    nbytes += len(raw)
                    h = hashlib.blake2b(raw, digest_size=16).digest()
                    stats["documents_read"] += 1
                    if dedup:
                        if h in seen:
                            stats["dropped_duplicates"] += 1
                            continue
                        seen.add(h)
                    if len(ids) < max(min_length, 1):
                        stats["dropped_short"] += 1
                        continue
                    split = "val" if val_fraction > 0 and is_validation(h, val_fraction) else "train"
                    if isinstance(ids, list):
                        ids.append(tok.eos_id)
                        writers[split].add(np.array(ids, dtype=np.uint32))
                    else:  # a long text's array (see _encode_next)
                        writers[split].add(np.append(ids, np.uint32(tok.eos_id)))
                bar.update(nbytes)
                stats["text_bytes"] += nbytes
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
