"""Example files for fine-tuning: JSONL, CSV and Parquet read alike; bad labels fail with file and row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data import Examples, label_ids, label_names, read_table
from llm.errors import UserError

ROWS = [{"text": "a fine film", "label": "pos"}, {"text": "dull", "label": "neg"}, {"text": "grand", "label": "pos"}]


def write(tmp_path, kind: str, rows: list[dict]):
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        lines = ["text,label"] + [f"{r['text']},{'' if r['label'] is None else r['label']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_the_three_formats_read_the_same_columns(tmp_path, kind):
    table = read_table(write(tmp_path, kind, ROWS), ["text", "label"])
    assert table == {"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}


def test_string_labels_sort_into_a_label_map_and_map_back():
    names = label_names(["pos", "neg", "pos"], "f.jsonl")
    assert names == ["neg", "pos"]
    assert label_ids(["pos", "neg", "pos"], names, "f.jsonl") == [1, 0, 1]


def test_integer_labels_sort_numerically_and_csv_numerals_match_them():
    names = label_names([10, 2, 1], "f.jsonl")
    assert names == ["1", "2", "10"]
    assert label_ids(["10", "1"], names, "g.csv") == [2, 0]  # a CSV holds numerals as text


def test_mixed_label_types_name_file_and_row(tmp_path):
    path = write(
        tmp_path, "jsonl", [{"text": "a", "label": "1"}, {"text": "b", "label": "2"}, {"text": "c", "label": 3}]
    )
    with pytest.raises(
        UserError, match=rf"{path}: row 3: label 3 is an integer, row 1's is a string \(labels of mixed"
    ):
        label_names(read_table(path, ["label"])["label"], path)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_missing_label_names_file_and_row(tmp_path, kind):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": None}]
    path = write(tmp_path, kind, rows)
    with pytest.raises(UserError, match=rf"{path}: row 2: the label field 'label' is missing"):
        label_names(read_table(path, ["text", "label"])["label"], path)


def test_a_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path, "csv", ROWS)
    with pytest.raises(UserError, match="no column 'sentence' \\(columns: text, label\\)"):
        read_table(path, ["sentence"])


def test_a_label_outside_the_model_map_names_the_row():
    with pytest.raises(UserError, match="v.jsonl: row 2: label 'meh' is not one of the model's labels"):
        label_ids(["pos", "meh"], ["neg", "pos"], "v.jsonl")


def test_examples_follow_the_global_order_and_resume():
    samples = [{"i": i} for i in range(10)]
    whole = [s["i"] for s in Examples(samples, seed=3)]
    ranks = [[s["i"] for s in Examples(samples, seed=3, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(whole) == list(range(10))
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]  # rank r takes samples r, r + W, ...
    first = Examples(samples, seed=3)
    it = iter(first)
    consumed = [next(it)["i"] for _ in range(4)]
    resumed = Examples(samples, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert consumed + [s["i"] for s in resumed] == whole
