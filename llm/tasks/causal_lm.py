"""Causal language modeling: next-token prediction (GPT, LLaMA).

Labels are already shifted: `labels[:, t]` is the target for position t (the
data pipeline yields windows of seq_len + 1 tokens). Positions labelled -100
carry no loss, as in PyTorch and Hugging Face.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.errors import UserError
from llm.models.base import Model
from llm.models.config import ModelConfig
from llm.models.hf import linear_rules
from llm.models.layers import LMHead
from llm.models.transformer import KVCache, ModelOutput, check_token_labels
from llm.tasks.base import Task


class CausalLM(Model):
    """The trunk and an output projection to the vocabulary. The loss goes through the
    fused linear cross-entropy, so training (return_logits=False) never builds full logits."""

    task = "causal_lm"

    def __init__(self, cfg: ModelConfig, options=None):
        super().__init__(cfg, options)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        self.post_init()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.tok_embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) int -> logits (B, T, vocab) and, with labels (B, T), the mean token loss.
        `document_ids` (B, T) keep attention inside each document of packed rows (see Transformer)."""
        check_token_labels(labels, input_ids)
        h = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, document_ids=document_ids
        )
        logits, loss = self.lm_head(h, labels, return_logits)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        from llm.models.generation import generate

        return generate(self, input_ids, **kwargs)


def shard_eos_id(path) -> int:
    """The EOS id that ends each document of a token shard directory (its manifest's tokenizer);
    UserError naming data.document_mask when the manifest has none."""
    from llm.data import load_manifest

    eos = load_manifest(path)["tokenizer"].get("eos_id")
    if eos is None:
        raise UserError(
            f"data.document_mask: {path}: the manifest names no EOS id, so its documents cannot be told apart "
            "(prepare the shards with a tokenizer that has an EOS token)"
        )
    return int(eos)


class CausalLMTask(Task):
    name = "causal_lm"
    model_class = CausalLM
    families = ("gpt", "llama", "bert")
    causal = True
    language_model = True
    packs_documents = True
    sequence_parallel = True
    tensor_parallel = True

    def shard_stream(self, cfg, data, path, seed, rank, world_size):
        from llm.data import PackedDocuments, PackedTokens, check_vocab, collate_causal_lm

        check_vocab(path, cfg.vocab_size)
        stream = PackedTokens(path, data.seq_len, seed, rank, world_size)
        if not data.document_mask:
            return stream, collate_causal_lm
        return stream, PackedDocuments(shard_eos_id(path))

    def synthetic_batch(self, corpus, indices, cfg, seq_len):
        windows = torch.stack([corpus.text(i, seq_len + 1) for i in indices])
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def hf_head_rules(self, cfg):
        return [] if cfg.tie_embeddings else linear_rules("lm_head", "lm_head", bias=False, base=False)

    def hf_tied(self, cfg):
        return {"transformer.tok_embed.weight": ("lm_head.weight",)} if cfg.tie_embeddings else {}
