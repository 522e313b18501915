"""Tokenizers are Hugging Face `tokenizers` files (tokenizer.json), wrapped with the
special-token ids the pipeline needs."""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

from llm.errors import UserError
from llm.fileio import write_atomic
from llm.log import logger

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
        # llm pads, packs and cuts sequences itself: a tokenizer.json's own padding (MiniLM's pads every
        # text to 128 tokens) would put pad ids into documents, and its truncation would cut them silently
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
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

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token (never masked by MLM)."""
        return sorted(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = False, ordinary: bool = True) -> list[int]:
        """Token ids of `text`. `ordinary` (the default, as tiktoken's encode_ordinary): text that
        spells a special token ("<|endoftext|>") is encoded as the characters it is, so only the
        pipeline itself ever places a control token."""
        return self.encode_batch([text], add_special_tokens, ordinary)[0]

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False, ordinary: bool = True
    ) -> list[list[int]]:
        previous = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = ordinary
        try:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        finally:
            self.tokenizer.encode_special_tokens = previous

    def encode_template(self, template: str, text: str, slot: str = "{prompt}") -> list[int]:
        """Token ids of `template` with its one `slot` replaced by `text`: the special tokens the
        template spells are control tokens, whatever `text` spells stays ordinary text.

        The filled template is encoded as one string, special tokens recognised, as transformers'
        `apply_chat_template` does (so an export's chat template reproduces these ids); where `text`
        itself spells a special token, the template's parts and `text` are encoded apart instead."""
        before, after = template.split(slot)
        start, end = len(before), len(before) + len(text)
        previous = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = False
        try:
            encoding = self.tokenizer.encode(before + text + after, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = previous
        special = set(self.special_ids)
        spans = [span for i, span in zip(encoding.ids, encoding.offsets) if i in special]
        if not any(s < end and e > start for s, e in spans):
            return encoding.ids
        return self.encode(before, ordinary=False) + self.encode(text) + self.encode(after, ordinary=False)

    def token(self, kind: str) -> str | None:
        """The spelling of special token `kind` ("eos", "pad", ...) in this vocabulary, or None."""
        token_id = self.special_id(kind)
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def save_hf(
        self, out_dir: str | Path, model_max_length: int | None = None, chat_template: str | None = None
    ) -> list[Path]:
        """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out_dir`, so that
        `transformers.AutoTokenizer.from_pretrained(out_dir)` loads this tokenizer with its special
        tokens named (eos, bos, pad, unk, cls, sep, mask: those the vocabulary has) and
        `chat_template` (Jinja) when given."""
        import json

        from llm.fileio import write_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special = {f"{kind}_token": self.token(kind) for kind in SPECIAL_NAMES}
        special = {k: v for k, v in special.items() if v is not None}
        if "eos_token" in special and "[SEP]" != special["eos_token"]:  # GPT-2 style: one token for all three
            special.setdefault("bos_token", special["eos_token"])
            special.setdefault("unk_token", special["eos_token"])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if chat_template is not None:
            config["chat_template"] = chat_template
        paths = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
        if self.path.resolve() != paths[0].resolve():
            write_atomic(paths[0], self.path.read_bytes())
        write_atomic(paths[1], json.dumps(config, indent=2) + "\n")
        write_atomic(paths[2], json.dumps(special, indent=2) + "\n")
        return paths

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


BPE_SPECIALS = ["<|endoftext|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    sources,
    out_dir: str | Path,
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: list[str] | None = None,
    text_field: str = "text",
    limit_bytes: int | None = None,
) -> Path:
    """Train a byte-level BPE (GPT) or WordPiece (BERT) tokenizer and write out_dir/tokenizer.json.

    sources: files, directories, .jsonl (text_field), .parquet (column text_field) or "stdlib".
    The default special tokens are <|endoftext|> for BPE and [PAD] [UNK] [CLS] [SEP] [MASK] for
    WordPiece; given ones are added after them. Progress: log lines at the start, after reading
    and at the end; on a terminal also a bar over the bytes read and the trainer's merge bar.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tqdm import tqdm

    from llm.data.sources import expand_sources, read_documents

    if kind not in ("bpe", "wordpiece"):
        raise UserError(f"tokenizer kind: expected 'bpe' or 'wordpiece', got {kind!r}")
    defaults = BPE_SPECIALS if kind == "bpe" else WORDPIECE_SPECIALS
    specials = defaults + [t for t in (special_tokens or []) if t not in defaults]
    if vocab_size < len(specials) + (256 if kind == "bpe" else 1):
        raise UserError(f"vocab_size: {vocab_size} is too small for {kind} with {len(specials)} special tokens")
    if kind == "bpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),
        )
    else:
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=sys.stderr.isatty()
        )
    files = expand_sources(sources, limit_bytes)
    total = sum(p.stat().st_size for p in files)
    logger.info(f"tokenizer: training {kind} ({vocab_size} ids) on {len(files)} files, {total / 1e6:.1f} MB")
    start = time.perf_counter()
    seen = []

    def texts():
        # the bar shows the reading and pair counting (most of the time); merges follow, with their own bar
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer: reading", disable=None) as bar:
            for path in files:
                for text in read_documents(path, text_field):
                    seen.append(1)
                    yield text
                bar.update(path.stat().st_size)
        logger.info(f"tokenizer: read {len(seen)} documents in {time.perf_counter() - start:.1f} s; merging")

    tok.train_from_iterator(texts(), trainer)
    if not seen:
        raise UserError(f"{sources}: no documents to train a tokenizer on")
    logger.info(f"tokenizer: done in {time.perf_counter() - start:.1f} s")
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    write_atomic(path, tok.to_str())
    return path


def adopt_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """Copy an existing tokenizer.json (validated by loading it) into out_dir."""
    tok = Tokenizer(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    if path.resolve() != tok.path.resolve():
        write_atomic(path, tok.path.read_bytes())
    return path


# ----------------------------------------------------------------------------
# Long texts: cut between words before a tokenizer reads them
# ----------------------------------------------------------------------------

_BOUNDARY = re.compile(r"(?<=\S)\s(?=\S)")
CHARS_PER_TOKEN = 256  # generous: English text averages about 4 characters a token


def split_text(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most about `limit` characters, each cut just before a single whitespace
    character between two non-space ones, where a BPE or WordPiece pre-tokenizer splits anyway (so
    the pieces' tokens are the whole text's). A stretch of `limit` characters without such a place
    is cut at `limit` (the tokens at that one cut may differ from the whole text's)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        window_start = start + limit // 2
        cut = None
        for match in _BOUNDARY.finditer(text, window_start, start + limit):
            cut = match.start()
        cut = cut if cut is not None and cut > start else start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def head_text(text: str, max_tokens: int) -> str:
    """The start of `text` that holds its first `max_tokens` tokens, for a tokenizer to read when only
    those are kept: a tokenizer holds ~200 bytes of state per character of its input (one 10 MB
    example cut to 32 tokens took 1.6 GB). Cut between two words (`split_text`) after at least
    max_tokens * CHARS_PER_TOKEN / 2 characters, so the tokens are the whole text's unless they
    average over 128 characters (a run of whitespace that WordPiece drops); `text` itself when shorter."""
    limit = max_tokens * CHARS_PER_TOKEN
    return text if len(text) <= limit else split_text(text[: limit + 1], limit)[0]
