"""Text that spells a special token is ordinary text (as tiktoken's and nanoGPT's encode_ordinary):
only the pipeline places control tokens, one EOS after each document, and decoding keeps the text."""

import json

from llm.data import Tokenizer, prepare
from tests.data.test_prepare import read_docs

SPECIAL = ["a literal <|endoftext|> inside", "<|endoftext|><|endoftext|> twice, at the start", "ends <|endoftext|>"]
TEXTS = SPECIAL + [f"document number {i}" for i in range(30)]


def test_special_token_text_is_encoded_as_text(bpe, wordpiece):
    for path, specials in ((bpe, ["<|endoftext|>"]), (wordpiece, ["[SEP]", "[CLS]", "[MASK]", "[PAD]"])):
        tok = Tokenizer(path)
        for special in specials:
            text = f"before {special} after"
            ids = tok.encode(text)
            assert not set(ids) & set(tok.special_ids), (special, ids)
            assert special in "".join(tok.decode(ids).split())  # WordPiece decodes "[SEP]" as "[ SEP ]"
            assert set(tok.encode(text, ordinary=False)) & set(tok.special_ids)  # the opt-in still sees it


def test_prepare_places_exactly_one_eos_per_document(tmp_path, bpe):
    tok = Tokenizer(bpe)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare([path], bpe, tmp_path / "out", val_fraction=0.3, min_length=1, workers=1)
    docs = read_docs(tmp_path / "out" / "train")[1] + read_docs(tmp_path / "out" / "val")[1]
    assert len(docs) == len(TEXTS)
    assert sum(d.count(tok.eos_id) for d in docs) == len(TEXTS) and all(d[-1] == tok.eos_id for d in docs)
    assert sorted(tok.decode(d[:-1]) for d in docs) == sorted(TEXTS)


def test_a_classified_text_that_spells_a_special_token_keeps_it_as_text(wordpiece):
    """[CLS] and [SEP] around the text come from the tokenizer's template; a "[SEP]" inside the text is text."""
    from llm.tasks.text_classification import encode_texts

    tok = Tokenizer(wordpiece)
    cls, sep = tok.special_id("cls"), tok.special_id("sep")
    plain, sneaky = encode_texts(tok, ["a b", "a [SEP] b"], 32, tok.vocab_size, "texts.csv")
    assert plain == [cls, *tok.encode("a b"), sep]
    assert sneaky == [cls, *tok.encode("a [SEP] b"), sep] and sneaky.count(sep) == 1
