"""Masked language modeling (BERT), with next-sentence prediction when `nsp: true`.

BERT's pretraining is both objectives together (Devlin et al., 2019): 15% of
the tokens are chosen, of which 80% become [MASK], 10% a random token and 10%
stay; the loss counts the chosen positions only. With NSP each sample is
[CLS] A [SEP] B [SEP], B following A or taken from elsewhere, and a binary
classifier on the pooled [CLS] vector says which.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ConfigError
from llm.kernels.reference import IGNORE_INDEX, upcast
from llm.models.base import Model, Pooler
from llm.models.config import ModelConfig
from llm.models.hf import Rule, linear_rules
from llm.models.layers import LMHead, Norm
from llm.models.transformer import ModelOutput, check_token_labels
from llm.tasks.base import Task


@dataclasses.dataclass
class MaskedLMOptions:
    nsp: bool = False  # also next-sentence prediction (BERT pretraining)
    mlm_probability: float = 0.15  # share of tokens chosen for the loss

    def validate(self, path: str = "task") -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{path}.mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")


class MaskedLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm) then the decoder to the vocabulary,
    whose weight is tied to the token embeddings; the loss is computed inside (see LMHead)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        self.norm = Norm(cfg.d_model, "layernorm", cfg.norm_eps, bias=True)
        self.decoder = LMHead(cfg.d_model, cfg.vocab_size, bias=True)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True):
        """(logits or None, MLM loss or None); only masked positions pay for the vocabulary projection."""
        loss = None
        if labels is not None:
            masked = labels != IGNORE_INDEX
            _, loss = self.decoder(self.transform(h[masked]), labels[masked], return_logits=False)
        logits = self.decoder(self.transform(h))[0] if return_logits or labels is None else None
        return logits, loss

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h), approximate=self.approximate))


class MaskedLM(Model):
    """Masked LM on every position, plus NSP on the pooled first token when `options.nsp`."""

    task = "masked_lm"

    def __init__(self, cfg: ModelConfig, options: MaskedLMOptions | None = None):
        options = options or MaskedLMOptions()
        super().__init__(cfg, options)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.mlm = MaskedLMHead(cfg)
        self.nsp = nn.Linear(cfg.d_model, 2) if options.nsp else None
        self.post_init()
        self.mlm.decoder.weight = self.transformer.tok_embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, vocab), nsp_logits (B, 2); the loss is MLM (+ NSP)."""
        check_token_labels(labels, input_ids)
        h = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = self.pooler(h[:, 0]) if self.pooler is not None else None
        nsp_logits = self.nsp(pooled) if self.nsp is not None else None
        logits, loss = self.mlm(h, labels, return_logits)
        if loss is not None and next_sentence_label is not None and nsp_logits is not None:
            loss = loss + F.cross_entropy(upcast(nsp_logits), next_sentence_label.view(-1))
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=pooled, nsp_logits=nsp_logits)


class MaskedLMTask(Task):
    name = "masked_lm"
    model_class = MaskedLM
    Options = MaskedLMOptions
    families = ("gpt", "llama", "bert")
    causal = False
    language_model = True

    def check(self, cfg, path="model"):
        super().check(cfg, path)
        if self.options.nsp and not cfg.pooler:
            raise ConfigError(f"{path}.pooler", "next-sentence prediction (task nsp: true) needs pooler: true")

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import MLMCollator, PackedTokens, SentencePairs, check_vocab

        check_vocab(path, cfg.vocab_size)
        tok = self.tokenizer(data, "masking needs the tokenizer's [MASK], [CLS], [SEP] and [PAD]")
        if self.options.nsp:
            stream = SentencePairs(path, data.seq_len, seed, rank, world_size)
        else:
            stream = PackedTokens(path, data.seq_len - 1, seed, rank, world_size)
        return stream, MLMCollator(tok, self.options.mlm_probability)

    def synthetic_batch(self, corpus, indices, cfg, seq_len):
        """[CLS] A [SEP] B [SEP]; B follows A (label 0) or comes from another sample (label 1)."""
        from llm.data.synthetic import CLS, MASK, SEP

        half = (seq_len - 3) // 2
        rows, types, labels, nsp = [], [], [], []
        for i in indices:
            g = corpus.generator(i + 11)
            text = corpus.text(i, 2 * half)
            a, b = text[:half], text[half:]
            is_random = bool(torch.rand((), generator=g) < 0.5)
            if is_random:
                b = corpus.text(i + 1_000_000_000, half)
            ids = torch.cat([torch.tensor([CLS]), a, torch.tensor([SEP]), b, torch.tensor([SEP])])
            tt = torch.cat([torch.zeros(half + 2, dtype=torch.long), torch.ones(half + 1, dtype=torch.long)])
            special = (ids == CLS) | (ids == SEP)
            chosen = (torch.rand(ids.shape, generator=g) < self.options.mlm_probability) & ~special
            rows.append(torch.where(chosen, torch.full_like(ids, MASK), ids))
            labels.append(torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX)))
            types.append(tt)
            nsp.append(int(is_random))
        ids = torch.stack(rows)
        batch = {
            "input_ids": ids,
            "token_type_ids": torch.stack(types),
            "attention_mask": torch.ones_like(ids),
            "labels": torch.stack(labels),
        }
        if self.options.nsp:
            batch["next_sentence_label"] = torch.tensor(nsp)
        return batch

    def hf_head_rules(self, cfg):
        p = "cls.predictions"
        rules = linear_rules("mlm.dense", f"{p}.transform.dense", base=False)
        rules += linear_rules("mlm.norm", f"{p}.transform.LayerNorm", base=False)
        rules += [Rule("mlm.decoder.bias", (f"{p}.bias",), base=False)]
        if self.options.nsp:
            rules += linear_rules("nsp", "cls.seq_relationship", base=False)
        return rules

    def hf_tied(self, cfg):
        p = "cls.predictions"
        return {"transformer.tok_embed.weight": (f"{p}.decoder.weight",), "mlm.decoder.bias": (f"{p}.decoder.bias",)}
