"""Tokenizers are Hugging Face `tokenizers` files (tokenizer.json), wrapped with the
special-token ids the pipeline needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llm.errors import UserError

# Names under which tokenizers commonly store each special token.
SPECIAL_NAMES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "unk": ("[UNK]", "<unk>"),
}


class Tokenizer:
    """A tokenizer.json with its vocabulary size, special ids and identity (sha256 of the file)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found")
        raw = path.read_bytes()
        try:
            self.tokenizer = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_id(self, kind: str) -> int | None:
        """The id of the first known spelling of a special token kind ("eos", "pad", ...)."""
        for name in SPECIAL_NAMES[kind]:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def eos_id(self) -> int | None:
        return self.special_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self.special_id("pad")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)
