"""Tokenizer training: byte-level BPE is lossless, WordPiece carries BERT's specials and template."""

import json

import pytest

from llm.data import Tokenizer, train_tokenizer
from llm.errors import UserError


def test_bpe_round_trips_any_text(bpe):
    tok = Tokenizer(bpe)
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ \t tabs\n"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.vocab_size == 600 and tok.eos_id == 0 and tok.special_ids == [0]


def test_wordpiece_has_bert_specials(wordpiece):
    tok = Tokenizer(wordpiece)
    ids = [tok.special_id(k) for k in ("pad", "cls", "sep", "mask", "unk")]
    assert None not in ids and sorted(ids) == tok.special_ids
    pair = tok.tokenizer.encode("import os", "print(x)")
    assert pair.ids[0] == tok.special_id("cls") and pair.ids[-1] == tok.special_id("sep")
    assert set(pair.type_ids) == {0, 1}


def test_train_from_jsonl_field_with_extra_special(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"sample text number {i}"}) + "\n" for i in range(50)))
    out = train_tokenizer([path], tmp_path / "tok", vocab_size=300, special_tokens=["<pad>"], text_field="body")
    tok = Tokenizer(out)
    assert tok.pad_id == tok.tokenizer.token_to_id("<pad>") and len(tok.special_ids) == 2
    with pytest.raises(UserError, match="expected an object with a string field 'text'"):
        train_tokenizer([path], tmp_path / "tok2", vocab_size=300)


def test_tokenizer_training_reports_progress(tmp_path, capsys):
    from llm.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 50)
    assert main(["data", "tokenizer", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("llm: tokenizer: training bpe (300 ids) on 3 files, 0.0 MB")
    assert any(line.startswith("llm: tokenizer: read 3 documents in ") for line in err)
    assert err[-1].startswith("llm: tokenizer: done in ")


def test_padding_and_truncation_saved_in_tokenizer_json_are_not_applied(wordpiece, tmp_path):
    """A tokenizer.json that pads to a fixed length and truncates (as MiniLM's does) encodes each text
    to exactly the ids of the same tokenizer with both turned off."""
    from tokenizers import Tokenizer as HFTokenizer

    plain = HFTokenizer.from_file(str(wordpiece))
    padded = HFTokenizer.from_file(str(wordpiece))
    padded.enable_padding(length=64, pad_id=0, pad_token="[PAD]")
    padded.enable_truncation(max_length=8)
    path = tmp_path / "tokenizer.json"
    padded.save(str(path))
    texts = ["def main(argv):", "return a list of every module imported by the file, in the order of first use"]
    saved = HFTokenizer.from_file(str(path)).encode(texts[1])
    assert len(saved.ids) == 64 and sum(saved.attention_mask) == 8  # the file does pad and cut

    tok = Tokenizer(path)
    assert tok.encode_batch(texts) == [plain.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.tokenizer.encode(texts[1]).ids == plain.encode(texts[1]).ids  # with [CLS] ... [SEP], uncut
