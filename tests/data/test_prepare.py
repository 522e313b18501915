"""prepare: exact tokens with EOS, dedup, min length, deterministic val split, same shards on any
number of workers, atomic writing; verify/check_vocab and every bad input named."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data import PackedTokens, Tokenizer, check_vocab, inspect, load_manifest, prepare, stdlib_files, verify
from llm.data import shards as S
from llm.data.prepare import is_validation, write_token_shards
from llm.errors import UserError


def corpus(tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 4) for i in range(60)]
    texts += [texts[3], texts[10], "", "x"]  # two duplicates, one empty, one short
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return path, texts


def read_docs(directory):
    manifest = load_manifest(directory)
    docs = []
    for shard in manifest["shards"]:
        values, offsets = S.shard_tokens(directory / shard["file"], shard, manifest["dtype"])
        docs += [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return manifest, docs


def test_prepare_writes_exact_documents(tmp_path, bpe):
    path, texts = corpus(tmp_path)
    tok = Tokenizer(bpe)
    summary = prepare(
        [path], bpe, tmp_path / "out", shard_tokens=300, val_fraction=0.2, min_length=2, workers=1, text_field="body"
    )
    assert summary["dropped_duplicates"] == 2 and summary["dropped_short"] == 2
    expected = {"train": [], "val": []}
    for text in dict.fromkeys(texts):
        ids = tok.encode(text)
        if len(ids) >= 2:
            h = hashlib.blake2b(text.encode(), digest_size=16).digest()
            expected["val" if is_validation(h, 0.2) else "train"].append(ids + [tok.eos_id])
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        manifest, docs = read_docs(tmp_path / "out" / split)
        assert docs == expected[split]
        assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tok.vocab_size
        assert manifest["tokenizer"]["sha256"] == tok.sha256
        assert manifest["num_tokens"] == sum(map(len, docs)) and len(manifest["shards"]) > 1
        for shard in manifest["shards"]:
            assert shard["sha256"] == S.sha256_file(tmp_path / "out" / split / shard["file"])
        verify(tmp_path / "out" / split)
    assert "documents" in inspect(tmp_path / "out" / "train")


def test_workers_do_not_change_the_shards(tmp_path, bpe):
    files = stdlib_files(150_000)
    one = prepare(files, bpe, tmp_path / "a", shard_tokens=5000, workers=1)
    two = prepare(files, bpe, tmp_path / "b", shard_tokens=5000, workers=2)
    assert one["train"] == two["train"]
    sha = lambda d: [s["sha256"] for s in load_manifest(d)["shards"]]  # noqa: E731
    assert sha(tmp_path / "a" / "train") == sha(tmp_path / "b" / "train")


def test_parquet_and_directory_sources(tmp_path, bpe):
    pq.write_table(pa.table({"text": ["alpha beta", "gamma delta"]}), tmp_path / "t.parquet")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one document")
    summary = prepare([tmp_path / "t.parquet", tmp_path / "d"], bpe, tmp_path / "out", workers=1)
    assert summary["train"]["documents"] == 3


def test_interrupted_prepare_keeps_the_old_dataset(tmp_path, bpe, monkeypatch):
    path, _ = corpus(tmp_path)
    prepare([path], bpe, tmp_path / "out", workers=1, text_field="body")  # an older, complete run
    calls = []
    real = S.write_shard

    def crash_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(S, "write_shard", crash_on_second)
    before = read_docs(tmp_path / "out" / "train")
    with pytest.raises(KeyboardInterrupt):
        prepare([path], bpe, tmp_path / "out", shard_tokens=200, workers=1, text_field="body")
    assert read_docs(tmp_path / "out" / "train") == before  # the new one was built aside, then dropped
    verify(tmp_path / "out" / "train")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


@pytest.fixture
def shards(tmp_path):
    docs = [np.arange(i, i + 50) for i in range(0, 500, 50)]
    write_token_shards(tmp_path / "s", docs, vocab_size=1000, shard_tokens=200)
    return tmp_path / "s"


def test_one_flipped_byte_is_detected(shards):
    shard = shards / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(S.ShardError, match="shard-00001.arrow: sha256"):
        verify(shards)


def test_truncated_shard_is_detected(shards):
    shard = shards / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(S.ShardError, match="shard-00000.arrow: .* bytes, manifest says"):
        PackedTokens(shards, 8)


def test_manifest_that_does_not_match_its_files(shards):
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["num_tokens"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(S.ShardError, match="shard-00000.arrow: .* tokens, manifest says"):
        PackedTokens(shards, 8)
    del manifest["shards"][1]["sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(S.ShardError, match=r"manifest.json: shards\[1\] is missing fields \['sha256'\]"):
        verify(shards)
    manifest["shards"][1]["sha256"] = "0" * 64
    manifest["shards"][0]["file"] = "shard-09999.arrow"
    path.write_text(json.dumps(manifest))
    with pytest.raises(S.ShardError, match="shard-09999.arrow: listed in .* but missing"):
        verify(shards)


def test_vocab_mismatch_and_token_beyond_vocabulary(tmp_path, shards):
    with pytest.raises(S.ShardError, match="vocabulary of 1000 ids, the model has 400"):
        check_vocab(shards, 400)
    check_vocab(shards, 1024)  # a model vocabulary padded above the tokenizer's is fine
    write_token_shards(tmp_path / "bad", [np.array([1, 2, 700])], vocab_size=1000)
    path = tmp_path / "bad" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["vocab_size"] = 600  # ids were written for a bigger vocabulary than the manifest claims
    path.write_text(json.dumps(manifest))
    with pytest.raises(S.ShardError, match="shard-00000.arrow: token id 700 is beyond the vocabulary"):
        verify(tmp_path / "bad")


def test_empty_and_missing_inputs(tmp_path, bpe):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no documents left"):
        prepare([tmp_path / "empty.jsonl"], bpe, tmp_path / "out", workers=1)
    with pytest.raises(UserError, match="nope.txt: no such file"):
        prepare([tmp_path / "nope.txt"], bpe, tmp_path / "out", workers=1)
    with pytest.raises(UserError, match="missing.json: tokenizer file not found"):
        prepare([tmp_path / "empty.jsonl"], tmp_path / "missing.json", tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: expected an object with a string field 'text'"):
        prepare([tmp_path / "bad.jsonl"], bpe, tmp_path / "out", workers=1)
    with pytest.raises(UserError, match="no such shard directory"):
        PackedTokens(tmp_path / "nowhere", 8)
