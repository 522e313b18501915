"""`llm bench decode|classify`: the bytes a decode step streams, the bandwidth limit, peers that run or say why
not, and the end-to-end run (table, JSON with the greedy check, PNG)."""

import json

import pytest
import torch

from llm import transforms
from llm.bench import inference
from tests.conftest import build

SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=200, max_seq_len=64)


def test_streamed_bytes_are_every_matmul_weight_once():
    """Per block qkv (64 -> 192), proj, fc_in (64 -> 128), fc_out, each with a bias; the tied head 200 x 64."""
    model = build(SMALL)
    per_block = (64 * 192 + 192) + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    assert inference.streamed_bytes(model) == 4 * (2 * per_block + 200 * 64)
    int8 = transforms.apply_transform(build(SMALL), {"name": "quantize", "method": "int8"})
    weights = 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64) + 200 * 64
    rows = 2 * (192 + 64 + 128 + 64) + 200  # one fp32 scale per output row
    biases = 2 * (192 + 64 + 128 + 64)
    assert inference.streamed_bytes(int8) == weights + 4 * rows + 4 * biases


def test_measure_times_models_and_peers_and_says_why_a_peer_is_missing():
    model = build(SMALL).eval()
    models = {"fp32": model, "int4": transforms.apply_transform(build(SMALL), {"name": "quantize", "method": "int4"})}

    def absent(model_dir, work, job):
        raise inference.PeerMissing("not installed (pip install nothing)")

    calls = []
    peers = (
        inference.Peer("counting peer", lambda model_dir, work, job: lambda: calls.append(1), 0.5),
        inference.Peer("absent peer", absent),
    )
    job = {"prompt": torch.randint(0, 200, (1, 5)), "new_tokens": 3}
    rows, missing = inference.measure(models, peers, job, rounds=2)
    assert [r["name"] for r in rows] == ["fp32", "int4", "counting peer"] and len(calls) == 3
    assert missing == {"absent peer": "not installed (pip install nothing)"}
    fp32, int4, peer = rows
    assert fp32["vs_baseline"] == 1 and all(r["tokens_per_s"] > 0 for r in rows)
    for r, model in ((fp32, models["fp32"]), (int4, models["int4"])):
        assert r["streamed_MB"] == inference.streamed_bytes(model) / 1e6
        assert r["limit_tokens_per_s"] == pytest.approx(r["copy_GBps"] * 1e3 / r["streamed_MB"])
    assert peer["streamed_MB"] == pytest.approx(fp32["streamed_MB"] / 8)  # 0.5 bytes per fp32 weight
    text = inference.speed_table(rows, missing)
    assert "absent peer: not measured: not installed" in text and "unstructured sparsity" in text


def test_classify_peers_run_a_mean_pooled_bert_classifier(tmp_path):
    """transformers' BertForSequenceClassification pools [CLS] through the pooler: on the same weights its logits
    are llm's with that pooling. ONNX Runtime's int8 graph takes the segment ids llm's forward defaults to zeros.
    (~14 s: most of it the dynamo ONNX export.)"""
    bert = dict(SMALL, family="bert", causal=False, norm_position="post", type_vocab_size=2, pooler=True, mlp="gelu")
    model = build(bert, task="text_classification", num_labels=3, pooling="mean").eval()
    ids = torch.randint(0, 200, (4, 10))
    job = {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    runners, missing = inference.prepare_peers(model, inference.CLASSIFY_PEERS, job, tmp_path)
    assert missing == {} and set(runners) == {"transformers fp32", "ONNX Runtime int8 (dynamic)"}
    first = build(bert, task="text_classification", num_labels=3, pooling="first").eval()
    first.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(runners["transformers fp32"]().logits, first(ids).logits, rtol=1e-4, atol=1e-5)
        (logits,) = [o for o in runners["ONNX Runtime int8 (dynamic)"]() if o.shape == (4, 3)]
        torch.testing.assert_close(torch.from_numpy(logits), model(ids).logits, rtol=0.1, atol=0.05)


def test_bench_decode_end_to_end(tmp_path, capsys):
    from llm.cli import main

    argv = ["bench", "decode", "--model", "gpt2-tiny", "--prompt-tokens", "4", "--new-tokens", "3", "--rounds", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("decode-*.json")
    record = json.loads(path.read_text())
    names = [r["name"] for r in record["rows"]]
    assert names[:3] == ["llm fp32", "llm int8", "llm int4 g32"]
    assert any(n.startswith("llm pruned") for n in names) and any(n.startswith("llm student (3 of 6") for n in names)
    assert "transformers fp32" in names  # a dev dependency
    assert set(record["not_measured"]) <= {"llama.cpp GGUF Q8_0", "llama.cpp GGUF Q4_0"}
    assert record["greedy_int8"]["steps"] == 3
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "limit tok/s" in capsys.readouterr().out
