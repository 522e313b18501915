"""Text classification: a label per text from the trunk's pooled vector.

BERT-style bodies pool the first ([CLS]) token through their pooler (Devlin et
al., 2019); causal bodies pool the last real token, as GPT-2 and LLaMA
classifiers do in Hugging Face transformers; `pooling: mean` averages the real
tokens.

Hugging Face: BertForSequenceClassification ([CLS] through the pooler, `classifier`
with bias), GPT2ForSequenceClassification and LlamaForSequenceClassification (the
last non-padding token, `score` without bias; a causal body's classifier has no bias
here either). transformers finds that token through `pad_token_id`, so an export
writes the id its batches were padded with (the model's pad, else EOS). Mean pooling
has no Hugging Face architecture.

Data: a JSONL, CSV or Parquet file with a text column (`data.text_field`) and a label
column (`data.label_field`, strings or integers); texts are cut to `data.seq_len` tokens
(the tokenizer's own special tokens, e.g. [CLS] ... [SEP], kept) and padded per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from llm.models.base import Model, Pooler, pool
from llm.models.config import ModelConfig
from llm.models.hf import family_adapter, linear_rules
from llm.models.layers import dropout
from llm.models.transformer import ModelOutput
from llm.tasks.classification import ClassificationTask, LabelOptions, classification_loss


@dataclasses.dataclass
class TextClassificationOptions(LabelOptions):
    pooling: Literal["first", "mean", "last"] | None = None  # None: last for causal bodies, else first


class TextClassifier(Model):
    """logits (B, num_labels) from the pooled vector (through the pooler when the config has one)."""

    task = "text_classification"

    def __init__(self, cfg: ModelConfig, options: TextClassificationOptions | None = None):
        options = options or TextClassificationOptions()
        super().__init__(cfg, options)
        self.pooling = options.pooling or ("last" if cfg.causal else "first")
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.dropout = dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, options.num_labels, bias=not cfg.causal)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ModelOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = pool(h, attention_mask, self.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        logits = self.classifier(self.dropout(pooled))
        return ModelOutput(logits=logits, loss=classification_loss(logits, labels), hidden_states=h, pooled=pooled)


class TextClassificationTask(ClassificationTask):
    name = "text_classification"
    model_class = TextClassifier
    Options = TextClassificationOptions
    families = ("gpt", "llama", "bert")

    def check(self, cfg, path="model"):
        super().check(cfg, path)
        self.check_labels("task")

    def dataset_labels(self, data, path):
        from llm.data import label_names, read_table, table_kind

        if table_kind(path) is None:
            return None
        return label_names(read_table(path, [data.label_field])[data.label_field], path, data.label_field)

    def file_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import Examples, PadCollator, label_ids, read_table
        from llm.data.examples import as_tensor, text_column

        columns = read_table(path, [data.text_field, data.label_field])
        texts = text_column(columns[data.text_field], path, data.text_field)
        labels = label_ids(columns[data.label_field], self.data_names(), path, data.label_field)
        tok = self.tokenizer(data, "text classification reads text files")
        ids = encode_texts(tok, texts, min(data.seq_len, cfg.max_seq_len), cfg.vocab_size, path)
        samples = [{"input_ids": as_tensor(i), "label": y} for i, y in zip(ids, labels)]
        return Examples(samples, seed, rank, world_size, name=str(path)), PadCollator(pad_id(tok, cfg))

    def resolved(self, cfg):
        return {**self.to_dict(), "pooling": self.options.pooling or ("last" if cfg.causal else "first")}

    def hf_architecture(self, cfg):
        """As the base class, but only for the pooling of the family's sequence classifier in
        transformers (BERT's through a pooler)."""
        head = family_adapter(cfg.family).classifier
        if head is None or self.resolved(cfg)["pooling"] != head.pooling or (head.pooler and not cfg.pooler):
            return None
        return super().hf_architecture(cfg)

    def hf_head_rules(self, cfg):
        head = family_adapter(cfg.family).classifier
        return [] if head is None else linear_rules("classifier", head.name, bias=head.bias, base=False)

    def hf_config(self, cfg):
        out = super().hf_config(cfg)
        if cfg.causal:  # transformers pools the last token that is not pad_token_id
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
            if pad is not None:
                out["pad_token_id"] = pad
        return out


def encode_texts(tok, texts: list[str], max_tokens: int, vocab_size: int, path) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens ([CLS] ... [SEP]) around it, cut to
    max_tokens; special tokens the text itself spells are encoded as text.

    Raises UserError naming the file when a text encodes to nothing or to ids beyond the vocabulary."""
    from llm.data.tokenizer import head_text
    from llm.errors import UserError

    heads = [head_text(t, max_tokens) for t in texts]  # a tokenizer's memory grows with the text it reads
    tokenizer = tok.tokenizer
    tokenizer.enable_truncation(max_length=max_tokens)
    previous, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True  # "[SEP]" in a text is text
    try:
        encodings = tokenizer.encode_batch(heads, add_special_tokens=True)
    finally:
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = previous
    ids = [e.ids for e in encodings]
    cut = sum(1 for e, h, t in zip(encodings, heads, texts) if e.overflowing or len(h) < len(t))
    if cut:
        from llm.log import logger

        logger.info(f"{path}: {cut} of {len(texts)} texts cut to {max_tokens} tokens (data.seq_len)")
    for i, row in enumerate(ids, 1):
        if not row:
            raise UserError(f"{path}: row {i}: the text encodes to no tokens")
        if max(row) >= vocab_size:
            raise UserError(
                f"{path}: row {i}: token id {max(row)} is beyond the model's vocabulary ({vocab_size}); "
                f"{tok.path} is not the model's tokenizer"
            )
    return ids


def pad_id(tok, cfg: ModelConfig) -> int:
    """The id padding uses: the model's, else the tokenizer's pad, else its EOS, else 0."""
    for candidate in (cfg.pad_token_id, tok.pad_id, tok.eos_id):
        if candidate is not None:
            return candidate
    return 0
