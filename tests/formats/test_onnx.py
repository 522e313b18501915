"""`llm convert --to onnx`: ONNX Runtime computes llm's logits (fp32, rel < 1e-5) for a BERT classifier, a GPT-2
and a ViT at two batch and sequence sizes, and `--int8` (ONNX Runtime's dynamic quantization) keeps a trained
classifier's accuracy within 1 point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm.cli import main
from llm.run.convert import write_format
from llm.run.loader import save_pretrained
from tests.conftest import build, rel_err

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = dict(vocab_size=300, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
BERT = dict(TINY, family="bert", causal=False, norm_position="post", type_vocab_size=2, pooler=True, mlp="gelu")
MODELS = {
    "bert-classifier": dict(BERT, task="text_classification", num_labels=3),
    "gpt2": dict(TINY),
    "llama-gqa": dict(TINY, family="llama", n_kv_heads=2, norm="rmsnorm", position="rotary", mlp="swiglu", bias=False),
    "vit-classifier": dict(
        family="vit",
        task="image_classification",
        num_labels=3,
        causal=False,
        image_size=8,
        patch_size=4,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        mlp="gelu",
    ),  # fmt: skip
}


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])


def inputs(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Fresh inputs; text rows padded on the right by a different amount each."""
    cfg = model.config
    if cfg.is_image:
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size)}
    mask = (torch.arange(seq)[None] < seq - torch.arange(batch)[:, None] % seq).long()
    out = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq)), "attention_mask": mask}
    if cfg.type_vocab_size:
        out["token_type_ids"] = (torch.arange(seq)[None] >= seq // 2).long().expand(batch, -1).contiguous()
    return out


@pytest.mark.parametrize("name", MODELS)
def test_onnx_runtime_logits_equal_llms(name, tmp_path):
    model = build(MODELS[name]).eval()
    write_format(model, tmp_path, "onnx")
    runner = session(tmp_path)
    assert [i.name for i in runner.get_inputs()] == list(inputs(model, 1, 1))
    for batch, seq in ((3, 5), (1, 13)):
        feed = inputs(model, batch, seq)
        with torch.no_grad():
            ref = model(**feed)
        values = runner.run(None, {k: v.numpy() for k, v in feed.items()})
        got = dict(zip([o.name for o in runner.get_outputs()], values))
        assert got["logits"].shape == tuple(ref.logits.shape)
        assert rel_err(torch.from_numpy(got["logits"]), ref.logits) < 1e-5, (batch, seq)
        assert rel_err(torch.from_numpy(got["hidden_states"]), ref.hidden_states) < 1e-5, (batch, seq)


def majority_data(n: int, generator: torch.Generator, seq: int = 11, vocab: int = 64):
    """Sequences of `seq` tokens; label 1 where most tokens lie in the lower half of the vocabulary."""
    ids = torch.randint(0, vocab, (n, seq), generator=generator)
    return ids, ((ids < vocab // 2).sum(1) > seq // 2).long()


def test_int8_keeps_a_trained_classifiers_accuracy(tmp_path, capsys):
    spec = dict(BERT, vocab_size=64, d_model=64, d_ff=128, task="text_classification", num_labels=2, pooling="mean")
    model = build(spec)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        ids, labels = majority_data(64, g)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_pretrained(model, tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "int8"), "--to", "onnx", "--int8"]) == 0
    assert "(--to onnx)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["model.onnx"]
    runner = session(tmp_path / "int8")
    assert any(n.op_type.startswith(("MatMulInteger", "DynamicQuantize")) for n in _graph(tmp_path / "int8").node)
    ids, labels = majority_data(2000, g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = (model(ids, attention_mask=mask).logits.argmax(-1) == labels).float().mean().item()
    logits = runner.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                     "token_type_ids": np.zeros_like(ids.numpy())})[0]  # fmt: skip
    theirs = (torch.from_numpy(logits).argmax(-1) == labels).float().mean().item()
    assert ours > 0.9, ours  # the classifier has learned the task
    assert abs(theirs - ours) <= 0.01, (ours, theirs)
    meta = {p.key: p.value for p in _graph_model(tmp_path / "int8").metadata_props}
    assert meta["llm.task"] == "text_classification" and json.loads(meta["llm.int8"]) is True


def _graph_model(path):
    import onnx

    return onnx.load(str(path / "model.onnx"))


def _graph(path):
    return _graph_model(path).graph


def test_what_onnx_cannot_hold_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import sys

    from llm.transforms import apply_transform

    quantized = apply_transform(build(TINY), {"name": "quantize", "method": "int8"})
    save_pretrained(quantized, tmp_path / "int8")
    assert main(["convert", str(tmp_path / "int8"), str(tmp_path / "out"), "--to", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX holds the unquantized model" in err[0]
    save_pretrained(build(TINY), tmp_path / "gpt")
    assert main(["convert", str(tmp_path / "gpt"), str(tmp_path / "out"), "--to", "onnx", "--gguf-type", "f16"]) == 2
    assert "--gguf-type does not apply to --to onnx" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["convert", str(tmp_path / "gpt"), str(tmp_path / "out"), "--to", "onnx", "--int8"]) == 2
    assert "pip install onnxruntime" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt", "int8"]
