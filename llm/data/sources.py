"""Where text comes from: files, directories, JSONL (a field), Parquet (a column), or the
running Python's standard library (the embedded default corpus, present everywhere)."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from llm.errors import UserError

STDLIB = "stdlib"


def stdlib_files(limit_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files in sorted order (UTF-8 only, no site-packages),
    stopping before `limit_bytes` would be exceeded, so a quickstart can take a few MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        size = path.stat().st_size
        if limit_bytes is not None and total + size > limit_bytes:
            if files:
                break
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test fixtures are deliberately not UTF-8; not part of the corpus
        files.append(path)
        total += size
    if not files:
        raise UserError(f"{root}: no standard library source files found (limit_bytes={limit_bytes})")
    return files


def expand_sources(sources, limit_bytes: int | None = None) -> list[Path]:
    """Paths of every file the sources name, in a fixed order; "stdlib" expands to stdlib_files()."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        if str(source) == STDLIB:
            files += stdlib_files(limit_bytes)
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: directory holds no files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    if not files:
        raise UserError("no input sources given")
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file: a JSONL line's field, a Parquet column's rows, or the whole text."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise UserError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield record[text_field]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        if text_field not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    raise UserError(f"{path}: column {text_field!r} holds {type(value).__name__}, expected strings")
                yield value
    else:
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); pass text, .jsonl or .parquet files") from None


def iter_documents(sources, text_field: str = "text", limit_bytes: int | None = None) -> Iterator[str]:
    for path in expand_sources(sources, limit_bytes):
        yield from read_documents(path, text_field)
