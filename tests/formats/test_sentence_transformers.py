"""`llm convert --to sentence-transformers`: `SentenceTransformer(OUT).encode` (offline) gives llm's
embeddings: an encoder mean- or first-token-pooled, a contrastive model pooled and L2-normalised."""

from __future__ import annotations

import os

import pytest
import torch

from llm.cli import main
from llm.data import Tokenizer, train_tokenizer
from llm.models.base import pool
from llm.run.loader import save_pretrained
from tests.conftest import build, rel_err
from tests.formats.test_compressed_tensors import BERT, GPT

st = pytest.importorskip("sentence_transformers")

TEXTS = ["a short one", "the second sentence is rather longer than the first", "three", "x y z w v u"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    (root / "corpus.txt").write_text("\n".join(TEXTS * 20))
    return {kind: train_tokenizer([str(root / "corpus.txt")], root / kind, kind=kind, vocab_size=size)
            for kind, size in (("wordpiece", 96), ("bpe", 300))}  # fmt: skip


def embeddings(model, tok: Tokenizer, how: str) -> torch.Tensor:
    """llm's pooled embeddings of TEXTS, one padded batch (right padding, attention mask)."""
    ids = tok.encode_batch(TEXTS, add_special_tokens=True)
    width = max(map(len, ids))
    x = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        out = model(x, attention_mask=mask)
    return out.pooled if model.task == "contrastive" else pool(out.hidden_states, mask, how)


@pytest.mark.parametrize("how", ["mean", "first"])
def test_an_encoder_encodes_as_llm_pools_it(how, tokenizers, tmp_path):
    model = build(BERT, task="encoder").eval()
    save_pretrained(model, tmp_path / "enc", tokenizers["wordpiece"])
    flags = [] if how == "mean" else ["--pooling", how]
    assert main(["convert", str(tmp_path / "enc"), str(tmp_path / "st"), "--to", "sentence-transformers", *flags]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py: nothing is fetched
    got = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert rel_err(got, embeddings(model, Tokenizer(tokenizers["wordpiece"]), how)) < 1e-5


def test_a_contrastive_model_keeps_its_pooling_and_normalisation(tokenizers, tmp_path):
    model = build({**GPT, "vocab_size": 300}, task="contrastive", pooling="last").eval()
    save_pretrained(model, tmp_path / "con", tokenizers["bpe"])
    assert main(["convert", str(tmp_path / "con"), str(tmp_path / "st"), "--to", "sentence-transformers"]) == 0
    got = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    want = embeddings(model, Tokenizer(tokenizers["bpe"]), "last")
    assert rel_err(got, want) < 1e-5 and torch.allclose(want.norm(dim=-1), torch.ones(len(TEXTS)))
    assert main(["convert", str(tmp_path / "con"), str(tmp_path / "x"), "--to", "sentence-transformers",
                 "--pooling", "mean"]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()
