"""Compression of a BERT text classifier (post-norm, biases, pooler, padded batches): structured
removal of zero heads/neurons keeps the logits, quantized and pruned classifiers reload bit-identical,
distillation takes the class logits and labels, and the report measures accuracy and examples/s."""

import json
import math
import random
import warnings

import pytest
import torch

from llm import transforms
from llm.compress import prune, quantize, report
from llm.compress.distill import Distiller
from llm.run.compress import compress_report, prune_model, quantize_model
from llm.run.loader import load_model, save_pretrained
from tests.compress.test_distill import reference
from tests.compress.test_prune import zero_units
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")
BERT = dict(family="bert", vocab_size=120, max_seq_len=24, d_model=64, n_layers=2, n_heads=4, d_ff=96)
BERT.update(norm="layernorm", norm_position="post", position="learned", mlp="gelu", bias=True, causal=False)
BERT.update(type_vocab_size=2, pooler=True, dropout=0.0, attention_dropout=0.0, pad_token_id=0)


def classifier(pooling="mean", **kw):
    return build({**BERT, **kw}, task="text_classification", num_labels=3, pooling=pooling)


def padded_batch(n=4, length=13, vocab=120):
    """Token ids (n, length) whose rows end in padding of different lengths, and their mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.int64)
    for row in range(1, n):
        ids[row, length - 3 * row :] = 0
        mask[row, length - 3 * row :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_removing_zero_heads_and_neurons_keeps_the_class_logits(pooling):
    model = classifier(pooling).eval()
    zero_units(model, {0: [1], 1: [3]}, {0: [2, 50], 1: [0, 95]})
    batch = padded_batch()
    before, params = model(**batch).logits, model.num_parameters()
    prune.prune_structured(model, heads=1, neurons=2)
    assert rel_err(model(**batch).logits, before) < 1e-6
    head_dim, d = BERT["d_model"] // BERT["n_heads"], BERT["d_model"]
    per_block = head_dim * (3 * d + 3) + head_dim * d + 2 * (2 * d + 1)  # q,k,v rows+bias, proj cols; 2 neurons
    assert params - model.num_parameters() == BERT["n_layers"] * per_block


@pytest.mark.parametrize("method", quantize.METHODS)
def test_quantized_classifier_reloads_bit_identical(tmp_path, method):
    model = transforms.apply_transform(classifier().eval(), {"name": "quantize", "method": method, "group_size": 32})
    batch = padded_batch()
    before = model(**batch).logits
    save_pretrained(model, tmp_path)
    reloaded = load_model(tmp_path).eval()
    assert reloaded.task == "text_classification" and reloaded.transforms[0]["method"] == method
    assert torch.equal(reloaded(**batch).logits, before)


def test_pruned_classifier_reloads_bit_identical(tmp_path):
    model = classifier().eval()
    prune.prune_structured(model, heads=1, neurons=24)
    prune.prune_unstructured(model, 0.5, "magnitude")
    batch = padded_batch()
    save_pretrained(model, tmp_path)
    reloaded = load_model(tmp_path).eval()
    assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    assert reloaded.num_parameters() == model.num_parameters() < classifier().num_parameters()
    assert prune.sparsity_of(reloaded) == pytest.approx(0.5, abs=0.01)


def test_distillation_of_a_classifier_uses_class_logits_and_hard_labels():
    torch.manual_seed(0)
    teacher, student = classifier(), classifier(n_layers=1, d_model=32, n_heads=2, d_ff=48)
    d = Distiller(student, teacher, "t", temperature=2.0, alpha=0.3).train()
    batch, labels = padded_batch(), torch.tensor([0, 2, 1, 2])
    out = d(**batch, labels=labels)
    with torch.no_grad():
        s, t = student(**batch).logits.double(), teacher.eval()(**batch).logits.double()
    hard = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(s.tolist(), labels.tolist())) / 4
    assert rel_err(out.loss, torch.tensor(reference(s, t, labels, hard, 2.0, 0.3))) < 1e-6
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """A JSONL file of labelled sentences, a WordPiece tokenizer trained on it, a saved classifier."""
    from llm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("classifier")
    rng = random.Random(0)
    words = "the film plot was very quite a this great awful boring superb".split()
    rows = [{"text": " ".join(rng.sample(words, 5)), "label": rng.choice(["neg", "pos"])} for _ in range(40)]
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([str(root / "val.jsonl")], root / "tok", kind="wordpiece", vocab_size=60)
    vocab = len(json.loads(tok.read_text())["model"]["vocab"])
    model = build({**BERT, "vocab_size": vocab}, task="text_classification", labels=["neg", "pos"], num_labels=2)
    save_pretrained(model, root / "orig", tok)
    return root


def test_report_compares_classifiers_by_accuracy_and_examples_per_second(tmp_path, sentiment):
    orig = str(sentiment / "orig")
    quantize_model(orig, str(tmp_path / "int8"), method="int8")
    prune_model(orig, str(tmp_path / "wanda"), method="wanda", sparsity=0.5, data=str(sentiment / "val.jsonl"))
    result = compress_report(
        orig, [str(tmp_path / "int8"), str(tmp_path / "wanda")], data=str(sentiment / "val.jsonl"),
        out=str(tmp_path / "r"), rounds=1, batch_size=8, names=["orig", "int8", "wanda"],
    )  # fmt: skip
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["orig", "int8", "wanda"]
    for i, r in enumerate(rows):
        assert r["examples_per_s"] > 0 and "tokens_per_s" not in r
        assert sum(map(sum, r["metrics"]["confusion"])) == 40
        assert (tmp_path / "r" / f"confusion-{i}" / "confusion.json").is_file()
    assert not (sentiment / "val.jsonl.eval").exists()  # nothing written beside the data
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"] / 2 and rows[2]["size_bytes"] == rows[0]["size_bytes"]
    header = report.table(rows).splitlines()[0]
    assert "ex/s" in header and "accuracy" in header
    assert result["rows"] == rows
