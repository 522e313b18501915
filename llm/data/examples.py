"""Labelled examples from table files (JSONL, CSV or Parquet) for fine-tuning.

A table file holds one example per row; fields are picked by name (`data.text_field`,
`data.label_field`, `data.prompt_field`, `data.response_field`). JSONL and CSV may be
compressed (`.gz`, `.bz2`, `.xz`). Every error names the file, and the row where a row is
at fault (rows count from 1, the first data row; a CSV's header is not a row).

Labels may be strings or integers, but one file uses one kind: `label_names` orders them
(integers numerically, strings by their text, numerals numerically) into the label map
that a classification model keeps (its `labels` option, exported as id2label).

`Examples` puts prepared samples into the global order of every reader (`Stream`): rank r
of W takes samples r, r + W, ...; the position counts the samples consumed, so runs resume.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path

import torch

from llm.data.stream import Stream
from llm.errors import UserError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def table_kind(path: str | Path) -> str | None:
    """The table kind ("jsonl", "csv" or "parquet") of a file name (compressed suffixes allowed), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffixes[-1])


def _open_text(path: Path):
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        return open(path, encoding="utf-8", newline="")
    return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", newline="")


def read_table(path: str | Path, fields: list[str]) -> dict[str, list]:
    """The columns `fields` of a table file: {field: [value per row]}.

    Raises UserError naming the file for an unknown format, a missing column or a bad row."""
    path = Path(path)
    kind = table_kind(path)
    if kind is None:
        raise UserError(f"{path}: expected a table file ending in {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises its own error types on a damaged file
            raise UserError(f"{path}: cannot read Parquet ({e})") from None
        _check_columns(path, fields, names)
        return pq.read_table(path, columns=fields).to_pydict()
    columns: dict[str, list] = {f: [] for f in fields}
    try:
        with _open_text(path) as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                _check_columns(path, fields, reader.fieldnames or [])
                for row in reader:
                    for name in fields:
                        columns[name].append(row[name])
            else:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
                    for name in fields:
                        columns[name].append(row.get(name))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if kind == "jsonl":
        for name in fields:
            if columns[name] and all(v is None for v in columns[name]):
                raise UserError(f"{path}: no row has the field {name!r}")
    return columns


def _check_columns(path: Path, fields: list[str], names: list[str]) -> None:
    missing = [f for f in fields if f not in names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names) or 'none'})")


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value != value  # NaN


def text_column(values: list, path: Path, field: str) -> list[str]:
    """Check that every row holds a string in `field`."""
    for i, v in enumerate(values, 1):
        if not isinstance(v, str):
            raise UserError(f"{path}: row {i}: field {field!r} must be text, got {v!r}")
    if not values:
        raise UserError(f"{path}: holds no rows")
    return values


def _label_key(value) -> str:
    return str(value).strip()


def label_names(values: list, path: str | Path, field: str = "label") -> list[str]:
    """The sorted distinct labels of a column, as names (str).

    Raises UserError naming the file and row of the first missing label, or of the first
    label whose type (string or integer) differs from the first row's."""
    if not values:
        raise UserError(f"{path}: holds no rows")
    first_kind = None
    for i, v in enumerate(values, 1):
        if _missing(v):
            raise UserError(f"{path}: row {i}: the label field {field!r} is missing")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise UserError(f"{path}: row {i}: label {v!r} must be a string or an integer")
        kind = "an integer" if isinstance(v, int) else "a string"
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise UserError(f"{path}: row {i}: label {v!r} is {kind}, row 1's is {first_kind} (labels of mixed types)")
    names = sorted({_label_key(v) for v in values})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return names


def label_ids(values: list, names: list[str], path: str | Path, field: str = "label") -> list[int]:
    """Each row's label as its index in `names` (the model's label map).

    Raises UserError naming the file and row of a missing label or one the map lacks."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, v in enumerate(values, 1):
        if _missing(v):
            raise UserError(f"{path}: row {i}: the label field {field!r} is missing")
        key = _label_key(v)
        if key not in index:
            raise UserError(f"{path}: row {i}: label {v!r} is not one of the model's labels ({', '.join(names)})")
        out.append(index[key])
    return out


class Examples(Stream):
    """Prepared samples (dicts of tensors and ints) in the global order of `Stream`."""

    def __init__(self, samples: list[dict], seed: int = 0, rank: int = 0, world_size: int = 1, name: str = ""):
        self.samples = samples
        super().__init__(len(samples), seed, rank, world_size, name=name)

    def get(self, index: int) -> dict:
        return self.samples[index]


def as_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)
