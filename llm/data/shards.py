"""Shard directories: Arrow IPC files plus a manifest.json that is written last.

A token shard holds one column `tokens` (list<uint16>, or list<uint32> when the vocabulary
does not fit 16 bits), one row per document, EOS already appended. An image shard holds
`pixels` (fixed_size_list<uint8>, C*H*W) and `label` (int32). The manifest lists every shard
with its sha256, byte size and counts, so a reader can refuse a truncated or altered file and
`verify` can prove every byte. Files are written under temporary names and renamed; the
manifest comes last, so an interrupted writer never leaves a manifest naming a partial shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

from llm.errors import UserError
from llm.fileio import contained, replace_dir, write_atomic

FORMAT = "llm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# (manifest fields, per-shard fields) each kind must have
REQUIRED = {
    "tokens": (
        ("dtype", "vocab_size", "tokenizer", "num_tokens", "num_documents"),
        ("file", "sha256", "bytes", "num_tokens", "num_documents", "max_token_id"),
    ),
    "images": (("image_shape", "classes", "num_images"), ("file", "sha256", "bytes", "num_images")),
}


class ShardError(UserError):
    """A shard directory that does not match its manifest, or a file that is not a valid shard."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staged(*out_dirs: Path):
    """Build new shard directories aside and put them in place only when the block succeeds.

    Yields one fresh directory per `out_dirs` entry; on success each replaces its target whole
    (`llm.fileio.replace_dir`: a reader sees the old dataset or the new one, also after a kill);
    on any error, interrupt included, the staged ones are deleted and the old datasets stay as
    they were. A target that is a folder of other files (no manifest.json) is refused."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(replace_dir(d, replaces=(MANIFEST,))) for d in out_dirs]


def write_shard(out_dir: Path, index: int, batch: pa.RecordBatch) -> dict:
    """Write one record batch as shard-<index>.arrow (temp name, fsync, rename); its manifest entry."""
    name = f"shard-{index:05d}.arrow"
    tmp = out_dir / f".{name}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    sha = sha256_file(tmp)
    tmp.replace(out_dir / name)
    return {"file": name, "sha256": sha, "bytes": (out_dir / name).stat().st_size, "rows": batch.num_rows}


def token_batch(documents: list[np.ndarray], dtype: str) -> pa.RecordBatch:
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    offsets = np.zeros(len(documents) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(documents).astype(dtype, copy=False)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.RecordBatch.from_arrays([tokens], names=["tokens"])


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def load_manifest(directory: str | Path, kind: str | None = None) -> dict:
    """The manifest of a shard directory, checked against the files (existence and byte size)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ShardError(f"{directory}: no such shard directory")
    if not path.is_file():
        raise ShardError(f"{path}: missing (an unfinished or interrupted `llm data prepare`?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not an llm shard manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, this llm reads {FORMAT_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise ShardError(f"{path}: holds {manifest.get('kind')!r} shards, expected {kind!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardError(f"{path}: lists no shards (empty dataset)")
    kind_keys = REQUIRED.get(manifest.get("kind"))
    if kind_keys is None:
        raise ShardError(f"{path}: unknown kind {manifest.get('kind')!r} (expected one of {sorted(REQUIRED)})")
    missing = [k for k in kind_keys[0] if k not in manifest]
    if missing:
        raise ShardError(f"{path}: missing fields {missing}")
    for i, shard in enumerate(shards):
        missing = [k for k in kind_keys[1] if not isinstance(shard, dict) or k not in shard]
        if missing:
            raise ShardError(f"{path}: shards[{i}] is missing fields {missing}")
    if manifest["kind"] == "tokens" and manifest["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{path}: dtype {manifest['dtype']!r}, expected 'uint16' or 'uint32'")
    for i, shard in enumerate(shards):
        name = shard["file"]
        if contained(directory, name) is None:
            raise ShardError(
                f"{path}: shards[{i}].file {name!r} is not a file of this directory (a manifest names its own "
                "shards by plain file name; paths outside it, absolute paths and links out are refused)"
            )
    for shard in shards:
        file = directory / shard["file"]
        if not file.is_file():
            raise ShardError(f"{file}: listed in {path} but missing")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise ShardError(f"{file}: {size} bytes, manifest says {shard['bytes']} (truncated or altered)")
    manifest["directory"] = str(directory)
    return manifest


def open_shard(path: Path) -> pa.RecordBatch:
    """Memory-map one shard as a single record batch (zero copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise ShardError(f"{path}: not a readable Arrow shard ({e})") from None
    if len(batches) != 1:
        raise ShardError(f"{path}: expected one record batch, found {len(batches)}")
    return batches[0]


# Shards whose bytes were checked against their manifest's sha256 in this process (and the
# processes forked from it), by (resolved path, inode, size, mtime): a shard is hashed once, when
# first opened, not as it is read. `VERIFY_ON_OPEN = False` turns the check off (benchmarks).
VERIFY_ON_OPEN = True
_verified: set[tuple] = set()


def check_on_open(path: Path, shard: dict) -> None:
    """The shard's sha256 against its manifest entry, once per file per process; ShardError naming it."""
    if not VERIFY_ON_OPEN:
        return
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _verified:
        return
    sha = sha256_file(path)
    if sha != shard["sha256"]:
        raise ShardError(
            f"{path}: contents differ from the manifest (sha256 {sha[:16]}... != {shard['sha256'][:16]}...): "
            "damaged or altered since `llm data prepare`; re-create it, `llm data verify` checks a directory"
        )
    _verified.add(key)


class BackgroundCheck:
    """`check_on_open` of many shards in a daemon thread, off the reader's hot path (hashlib releases
    the GIL); the reader calls `check()` (one attribute test) per batch and raises the first mismatch.
    Batches read before the hash of a damaged shard finishes may come from it: detection takes the
    time to hash the dataset once (sha256, ~0.5-1 GB/s per core)."""

    def __init__(self, items: list[tuple[Path, dict]]):
        self.error: ShardError | None = None
        self._thread: threading.Thread | None = None
        if VERIFY_ON_OPEN and items:
            self._thread = threading.Thread(target=self._run, args=(items,), name="llm-shard-check", daemon=True)
            self._thread.start()

    def _run(self, items) -> None:
        for path, shard in items:
            try:
                check_on_open(path, shard)
            except (ShardError, OSError) as e:
                self.error = e if isinstance(e, ShardError) else ShardError(f"{path}: cannot be read ({e})")
                return

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def token_range_error(path: Path, values: np.ndarray, offsets: np.ndarray, limit: int) -> ShardError | None:
    """A ShardError naming the first token id above `limit` in a shard (position, document), else None."""
    if not len(values) or int(values.max()) <= limit:  # one pass, no temporary
        return None
    pos = int(np.argmax(values > limit))
    doc = int(np.searchsorted(offsets, pos, side="right")) - 1
    return ShardError(
        f"{path}: token id {int(values[pos])} at token position {pos} "
        f"(document {doc}, token {pos - int(offsets[doc])}) "
        f"is beyond the largest id the manifest allows ({limit}); the shard is damaged or altered"
    )


def shard_tokens(path: Path, shard: dict, dtype: str, hash_now: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(flat token values, document offsets) of a token shard, checked against its manifest entry:
    counts and largest token id always, the sha256 once per process (`check_on_open`; with
    `hash_now=False` the caller hashes, e.g. in a `BackgroundCheck`).
    Raises ShardError naming the file (and the position of a token id out of range)."""
    batch = open_shard(path)
    if batch.schema.names != ["tokens"]:
        raise ShardError(f"{path}: columns {batch.schema.names}, expected ['tokens']")
    column = batch.column(0)
    if column.type != pa.list_(getattr(pa, dtype)()):
        raise ShardError(f"{path}: column type {column.type}, manifest says list<{dtype}>")
    values = column.flatten().to_numpy(zero_copy_only=True)
    offsets = column.offsets.to_numpy(zero_copy_only=True)
    offsets = offsets - offsets[0] if offsets[0] else offsets
    if len(column) != shard["num_documents"] or len(values) != shard["num_tokens"]:
        raise ShardError(
            f"{path}: {len(column)} documents / {len(values)} tokens, manifest says "
            f"{shard['num_documents']} / {shard['num_tokens']}"
        )
    if VERIFY_ON_OPEN and len(values):
        error = token_range_error(path, values, offsets, int(shard["max_token_id"]))
        if error is not None:
            raise error
    if hash_now:
        check_on_open(path, shard)
    return values, offsets


def verify(directory: str | Path) -> dict:
    """Check every shard's sha256, structure and counts against the manifest, and every token id
    against the vocabulary. Returns the manifest; raises ShardError naming the first bad file."""
    manifest = load_manifest(directory)
    directory = Path(directory)
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        sha = sha256_file(path)
        if sha != shard["sha256"]:
            raise ShardError(f"{path}: sha256 {sha[:16]}... does not match the manifest's {shard['sha256'][:16]}...")
        if manifest["kind"] == "tokens":
            values, _ = shard_tokens(path, shard, manifest["dtype"])
            top = int(values.max()) if len(values) else -1
            if top >= manifest["vocab_size"]:
                raise ShardError(f"{path}: token id {top} is beyond the vocabulary ({manifest['vocab_size']} ids)")
            if top != shard["max_token_id"]:
                raise ShardError(f"{path}: largest token id {top}, manifest says {shard['max_token_id']}")
        else:
            image_columns(path, shard, manifest)
    return manifest


def check_vocab(directory: str | Path, vocab_size: int) -> dict:
    """Refuse shards made with a tokenizer whose ids do not fit a model's vocabulary."""
    manifest = load_manifest(directory, kind="tokens")
    path = Path(directory) / MANIFEST
    if manifest["vocab_size"] > vocab_size:
        raise ShardError(
            f"{path}: tokenized with a vocabulary of {manifest['vocab_size']} ids, the model has {vocab_size}"
        )
    for shard in manifest["shards"]:
        if shard["max_token_id"] >= vocab_size:
            raise ShardError(
                f"{Path(directory) / shard['file']}: token id {shard['max_token_id']} is beyond the model's "
                f"vocabulary ({vocab_size} ids)"
            )
    return manifest


def image_columns(path: Path, shard: dict, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, C, H, W) uint8, labels (N,) int32) of an image shard, zero copy."""
    batch = open_shard(path)
    if batch.schema.names != ["pixels", "label"]:
        raise ShardError(f"{path}: columns {batch.schema.names}, expected ['pixels', 'label']")
    c, h, w = manifest["image_shape"]
    if batch.num_rows != shard["num_images"]:
        raise ShardError(f"{path}: {batch.num_rows} images, manifest says {shard['num_images']}")
    flat = batch.column(0).flatten().to_numpy(zero_copy_only=True)
    if flat.size != batch.num_rows * c * h * w:
        raise ShardError(f"{path}: pixel data does not hold {batch.num_rows} images of {c}x{h}x{w}")
    labels = batch.column(1).to_numpy(zero_copy_only=True)
    check_on_open(path, shard)
    return flat.reshape(batch.num_rows, c, h, w), labels


def inspect(directory: str | Path, tokenizer=None, samples: int = 2, chars: int = 200) -> str:
    """A readable summary: counts, dtype, tokenizer identity, and the first documents decoded."""
    manifest = load_manifest(directory)
    directory = Path(directory)
    lines = [f"{directory}: {manifest['kind']} shards, format v{manifest['format_version']}"]
    if manifest["kind"] == "tokens":
        tok = manifest["tokenizer"]
        lines += [
            f"  documents {manifest['num_documents']:,}  tokens {manifest['num_tokens']:,}  shards "
            f"{len(manifest['shards'])}  dtype {manifest['dtype']}",
            f"  tokenizer {tok.get('path')} (sha256 {tok['sha256'][:12]}, vocab {manifest['vocab_size']}, "
            f"eos {tok['eos_id']})",
        ]
        for key, value in manifest.get("stats", {}).items():
            lines.append(f"  {key}: {value}")
        if tokenizer is None and tok.get("path") and Path(tok["path"]).is_file():
            from llm.data.tokenizer import Tokenizer

            tokenizer = Tokenizer(tok["path"])
            if tokenizer.sha256 != tok["sha256"]:
                lines.append(f"  (tokenizer at {tok['path']} changed since prepare; not decoding)")
                tokenizer = None
        first = manifest["shards"][0]
        values, offsets = shard_tokens(directory / first["file"], first, manifest["dtype"])
        for i in range(min(samples, len(offsets) - 1)):
            ids = values[offsets[i] : offsets[i + 1]]
            text = tokenizer.decode(ids[:chars]) if tokenizer is not None else " ".join(map(str, ids[:40]))
            lines.append(f"  doc {i} ({len(ids)} tokens): {text[:chars]!r}")
    else:
        c, h, w = manifest["image_shape"]
        lines.append(
            f"  images {manifest['num_images']:,} of {c}x{h}x{w}  shards {len(manifest['shards'])}  "
            f"classes {len(manifest['classes'])}: {', '.join(manifest['classes'][:10])}"
        )
    return "\n".join(lines)
