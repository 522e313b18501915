"""Collators: MLM rates over many tokens, NSP 50% with true pairs contiguous, contrastive pairs,
and each batch accepted by the model head it is made for."""

import numpy as np
import torch

from llm.data import (
    ContrastiveTextCollator,
    MLMCollator,
    PackedTokens,
    SentencePairs,
    SpanPairs,
    StatefulLoader,
    Tokenizer,
    collate_causal_lm,
)
from llm.data.collate import IGNORE_INDEX
from tests.conftest import build


def contains(doc: np.ndarray, piece: np.ndarray) -> bool:
    if len(piece) > len(doc):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(doc, len(piece))
    return bool((windows == piece).all(axis=1).any())


def test_mlm_rates_and_special_tokens(wordpiece, wordpiece_shards):
    tok = Tokenizer(wordpiece)
    collate = MLMCollator(tok)
    windows = PackedTokens(wordpiece_shards, 255).samples_at(list(range(200)))
    ids = windows.clone()
    ids[:, 0] = tok.special_id("cls")  # specials inside the sequence are never masked
    ids[:, 100] = tok.special_id("sep")
    batch = collate(list(ids), generator=torch.Generator().manual_seed(0))
    chosen = batch["labels"] != IGNORE_INDEX
    special = torch.isin(ids, torch.tensor(tok.special_ids))
    assert not (chosen & special).any() and torch.equal(batch["input_ids"][special], ids[special])
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    rate = chosen.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.01, rate
    new = batch["input_ids"][chosen]
    as_mask = (new == tok.special_id("mask")).float().mean()
    kept = (new == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(1 - as_mask - kept - 0.1) < 0.015
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])  # nothing else changes


def test_nsp_pairs_half_true_and_true_pairs_contiguous(wordpiece_shards):
    ds = SentencePairs(wordpiece_shards, max_tokens=64, seed=3)
    labels, true_ok = [], 0
    for p in range(1000):
        s = ds.sample_at(p)
        labels.append(s["next_sentence_label"])
        if s["next_sentence_label"] == 0:
            doc = ds.document(int(ds.doc_ids[ds.index_at(p)]))
            true_ok += contains(doc, torch.cat([s["a"], s["b"]]).numpy())
        assert 1 <= len(s["a"]) <= 30 and len(s["b"]) <= 30
    assert abs(np.mean(labels) - 0.5) < 0.05
    assert true_ok == labels.count(0)


def test_bert_pretraining_batch_fits_masked_lm_and_resumes(wordpiece, wordpiece_shards):
    tok = Tokenizer(wordpiece)
    collate = MLMCollator(tok)

    def loader():
        return StatefulLoader(SentencePairs(wordpiece_shards, max_tokens=32, seed=1), 4, collate)

    ref = [b for _, b in zip(range(3), loader())]
    b = ref[0]
    assert b["token_type_ids"].shape == b["input_ids"].shape and b["next_sentence_label"].shape == (4,)
    first_sep = (b["input_ids"] == tok.special_id("sep")).int().argmax(1)
    assert all(b["token_type_ids"][i, : first_sep[i] + 1].sum() == 0 for i in range(4))
    model = build(
        dict(
            family="bert",
            task="masked_lm",
            nsp=True,
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=64,
            max_seq_len=64,
            type_vocab_size=2,
            pooler=True,
            causal=False,
            norm_position="post",
        )
    )
    out = model(**b)
    assert out.loss is not None and torch.isfinite(out.loss) and out.nsp_logits.shape == (4, 2)
    resumed = loader()
    it = iter(resumed)
    next(it)
    state = resumed.state_dict()
    again = loader()
    again.load_state_dict(state)
    for want, got in zip(ref[1:], again):
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_contrastive_text_pairs(wordpiece_shards):
    ds = SpanPairs(wordpiece_shards, span_tokens=16, seed=0)
    samples = ds.samples_at(list(range(6)))
    for p, s in enumerate(samples):
        doc = ds.document(int(ds.doc_ids[ds.index_at(p)]))
        assert contains(doc, s["a"].numpy()) and contains(doc, s["b"].numpy())
    batch = ContrastiveTextCollator(pad_id=0)(samples)
    assert batch["input_ids"].shape[0] == 12 and torch.equal(batch["labels"], torch.arange(6))
    model = build(
        dict(
            family="bert",
            task="contrastive",
            vocab_size=800,
            d_model=32,
            n_layers=1,
            n_heads=2,
            d_ff=64,
            max_seq_len=64,
            causal=False,
            pooling="mean",
        )
    )
    assert torch.isfinite(model(**batch).loss)


def test_causal_lm_batch_is_shifted_and_fits_causal_lm(bpe, tmp_path):
    from llm.data import prepare

    prepare("stdlib", bpe, tmp_path, workers=1, limit_bytes=50_000)
    windows = PackedTokens(tmp_path / "train", 8).samples_at([0, 1, 2])
    batch = collate_causal_lm(windows)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["labels"][:, -1], windows[:, -1])
    assert batch["input_ids"].shape == (3, 8) and batch["labels"].is_contiguous()
    model = build(dict(vocab_size=600, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16))
    out = model(**batch)  # the model does not shift again: position t predicts labels[t]
    ref = torch.nn.functional.cross_entropy(out.logits.double().flatten(0, 1), batch["labels"].flatten())
    assert abs(out.loss.item() - ref.item()) < 1e-4
