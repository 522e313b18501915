"""The report: measured rows for the original and its variants, as a table, JSON and PNG; quality is
perplexity for language models and accuracy for classifiers."""

import json

import pytest

from llm.compress import prune, report
from llm.run.compress import compress_report, prune_model, quantize_model
from llm.run.loader import save_pretrained
from tests.conftest import build


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from llm import data as D

    root = tmp_path_factory.mktemp("report")
    files = [str(p) for p in D.stdlib_files(150_000)]
    tok = D.train_tokenizer(files, root / "tok", kind="bpe", vocab_size=300)
    D.prepare(files, tok, root / "shards", shard_tokens=50_000, val_fraction=0.2)
    return root / "shards", tok


def test_report_measures_every_variant(tmp_path, shards):
    data, tok = shards
    model = build(dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=300, max_seq_len=32))
    save_pretrained(model, tmp_path / "orig", tok)
    quantize_model(str(tmp_path / "orig"), str(tmp_path / "int8"), method="int8")
    prune_model(str(tmp_path / "orig"), str(tmp_path / "pruned"), structured="heads=1,neurons=32")
    result = compress_report(
        str(tmp_path / "orig"),
        [str(tmp_path / "int8"), str(tmp_path / "pruned")],
        data=str(data / "val"),
        out=str(tmp_path / "report"),
        new_tokens=4,
        rounds=1,
        max_batches=2,
    )
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["orig", "int8", "pruned"]
    for r in rows:
        files = [tmp_path / r["name"] / f for f in ("model.safetensors", "config.yaml")]
        assert r["size_bytes"] == sum(f.stat().st_size for f in files)
        assert r["tokens_per_s"] > 0 and r["metrics"]["ppl"] > 1
    assert rows[2]["parameters"] < rows[0]["parameters"] == rows[1]["parameters"]
    assert rows[1]["transforms"][0]["name"] == "quantize"
    assert rows[0]["sparsity"] == 0 and rows[2]["sparsity"] == 0  # structured pruning leaves no zeros
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert result["rows"] == rows


def test_classifiers_are_compared_by_accuracy(tmp_path):
    common = {"parameters": 10, "tokens_per_s": float("nan")}
    rows = [
        {"name": "orig", "size_bytes": 400, "metrics": {"accuracy": 0.9}, **common},
        {"name": "int8", "size_bytes": 100, "metrics": {"accuracy": 0.885}, **common},
        {"name": "2:4", "size_bytes": 400, "metrics": {"accuracy": 0.8}, "sparsity": 0.5, **common},
    ]
    text = report.table(rows)
    assert "accuracy" in text.splitlines()[0] and "-1.50pt" in text and "4.00" in text
    assert text.splitlines()[-1].split()[4] == "50.0%" and text.splitlines()[2].split()[4] == "0.0%"
    report.write(rows, tmp_path, {})
    assert (tmp_path / "report.png").is_file()


def test_wanda_prune_needs_calibration_data(tmp_path):
    from llm.errors import UserError

    save_pretrained(build(dict(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=50)), tmp_path / "m")
    with pytest.raises(UserError, match="--data"):
        prune_model(str(tmp_path / "m"), str(tmp_path / "out"), method="wanda", sparsity=0.5)
    with pytest.raises(UserError, match="overwrite"):
        prune_model(str(tmp_path / "m"), str(tmp_path / "m"), sparsity=0.5)
    assert prune.METHODS == ("magnitude", "wanda")
