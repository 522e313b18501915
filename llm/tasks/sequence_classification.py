"""Sequence classification: a label per text from the trunk's pooled vector.

BERT-style bodies pool the first ([CLS]) token through their pooler (Devlin et
al., 2019); causal bodies pool the last real token, as GPT-2 and LLaMA
classifiers do in Hugging Face transformers; `pooling: mean` averages the real
tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from llm.config import ConfigError, ModelConfig
from llm.models.base import Model, Pooler, pool
from llm.models.hf import linear_rules
from llm.models.layers import dropout
from llm.models.transformer import ModelOutput
from llm.tasks.classification import ClassificationTask, classification_loss


@dataclasses.dataclass
class SequenceClassificationOptions:
    num_labels: int = 2
    labels: list[str] | None = None  # class names, index order
    pooling: Literal["first", "mean", "last"] | None = None  # None: last for causal bodies, else first

    def validate(self, path: str = "task") -> None:
        if self.num_labels < 2:
            raise ConfigError(f"{path}.num_labels", f"must be >= 2, got {self.num_labels}")


class SequenceClassifier(Model):
    """logits (B, num_labels) from the pooled vector (through the pooler when the config has one)."""

    task = "sequence_classification"

    def __init__(self, cfg: ModelConfig, options: SequenceClassificationOptions | None = None):
        options = options or SequenceClassificationOptions()
        super().__init__(cfg, options)
        self.pooling = options.pooling or ("last" if cfg.causal else "first")
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.dropout = dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, options.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ModelOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = pool(h, attention_mask, self.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        logits = self.classifier(self.dropout(pooled))
        return ModelOutput(logits=logits, loss=classification_loss(logits, labels), hidden_states=h, pooled=pooled)


class SequenceClassificationTask(ClassificationTask):
    name = "sequence_classification"
    model_class = SequenceClassifier
    Options = SequenceClassificationOptions
    families = ("gpt", "llama", "bert")
    hf_architectures = {"BertForSequenceClassification": ("bert", {})}

    def check(self, cfg, path="model"):
        super().check(cfg, path)
        self.check_labels("task")

    def hf_head_rules(self, cfg):
        return linear_rules("classifier", "classifier", base=False)
