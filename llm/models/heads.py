"""Task models: the shared trunk plus a head and its loss.

Causal LM labels are already shifted: `labels[:, t]` is the target for position
t (the data pipeline yields windows of seq_len + 1 tokens). Positions labelled
-100 carry no loss, as in PyTorch and Hugging Face.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.kernels.reference import upcast
from llm.models.layers import IGNORE_INDEX, LMHead, Norm, dropout, init_weights
from llm.models.transformer import KVCache, ModelOutput, Transformer


class Model(nn.Module):
    """Base of every task model: holds the config and the trunk, and initialises weights."""

    def __init__(self, cfg: ModelConfig, mask_token: bool = False):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg, mask_token=mask_token)

    def post_init(self) -> None:
        init_weights(self, self.config)
        if self.config.is_image:
            nn.init.normal_(self.transformer.cls_token, std=self.config.init_std)
            nn.init.normal_(self.transformer.pos_embed, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.gradient_checkpointing = enabled


class Pooler(nn.Module):
    """dense + tanh over one vector per sequence (BERT's and ViT's pooler)."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per sequence: the first token, the mean of real tokens, or the last real token."""
    if how == "first":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    # last: the rightmost real token, whether padding sits left or right
    last = hidden.shape[1] - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class CausalLM(Model):
    """Next-token prediction (GPT, LLaMA). The loss goes through the fused
    linear cross-entropy, so training (return_logits=False) never builds full logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
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
    ) -> ModelOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        logits, loss = self.lm_head(h, labels, return_logits)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        from llm.models.generation import generate

        return generate(self, input_ids, **kwargs)


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
    """BERT pretraining: masked LM (loss on masked positions only), plus next-sentence
    prediction on the pooled first token when the task is "pretraining"."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.mlm = MaskedLMHead(cfg)
        self.nsp = nn.Linear(cfg.d_model, 2) if cfg.task == "pretraining" else None
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
        h = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = self.pooler(h[:, 0]) if self.pooler is not None else None
        nsp_logits = self.nsp(pooled) if self.nsp is not None else None
        logits, loss = self.mlm(h, labels, return_logits)
        if loss is not None and next_sentence_label is not None and nsp_logits is not None:
            loss = loss + F.cross_entropy(upcast(nsp_logits), next_sentence_label.view(-1))
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=pooled, nsp_logits=nsp_logits)


class Encoder(Model):
    """The bare stack (BertModel, ViTModel): hidden states, and the pooled first token
    when the config has a pooler."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None) -> ModelOutput:
        h = self.transformer(
            input_ids, pixel_values=pixel_values, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        pooled = self.pooler(h[:, 0]) if self.pooler is not None else None
        return ModelOutput(hidden_states=h, pooled=pooled)


class SequenceClassifier(Model):
    """A label per sequence from its pooled vector (through the pooler when configured)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.dropout = dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ModelOutput:
        h = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = pool(h, attention_mask, self.config.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(upcast(logits), labels.view(-1)) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=pooled)


class ImageClassifier(Model):
    """ViT classification: a linear layer on the final [CLS] state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None) -> ModelOutput:
        h = self.transformer(pixel_values=pixel_values)
        logits = self.classifier(h[:, 0])
        loss = F.cross_entropy(upcast(logits), labels.view(-1)) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=h[:, 0])


class MaskedImageModel(Model):
    """SimMIM-style masked image modeling: a learned mask token replaces the masked
    patches, a linear decoder predicts every patch's pixels, and the L1 loss counts
    the masked patches' pixels only (as Hugging Face's ViTForMaskedImageModeling)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, mask_token=True)
        self.decoder = nn.Linear(cfg.d_model, cfg.patch_size**2 * cfg.num_channels)
        self.post_init()

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """Patch predictions (B, N, C*p*p) -> image (B, C, H, W); channel-major within a patch."""
        cfg = self.config
        b, p, c = h.shape[0], cfg.patch_size, cfg.num_channels
        side = cfg.image_size // p
        x = self.decoder(h[:, 1:]).view(b, side, side, c, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, side * p, side * p)

    def forward(self, pixel_values, bool_masked_pos=None) -> ModelOutput:
        h = self.transformer(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
        logits = self.reconstruct(h)
        loss = None
        if bool_masked_pos is not None:
            p, side = self.config.patch_size, self.config.image_size // self.config.patch_size
            mask = bool_masked_pos.reshape(-1, 1, side, side).to(logits.dtype)
            mask = mask.repeat_interleave(p, 2).repeat_interleave(p, 3)
            l1 = F.l1_loss(pixel_values.to(logits.dtype), logits, reduction="none")
            loss = (l1 * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


class Contrastive(Model):
    """InfoNCE on pooled, L2-normalised embeddings with in-batch negatives.

    A batch of 2B sequences (or images) holds B pairs: row i and row B + i are two
    views of one sample. `logits` is the (B, B) similarity matrix over the
    temperature; `labels[i]` is the index of row i's positive among the second
    halves (normally arange(B)). The loss is symmetric over both directions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None) -> ModelOutput:
        h = self.transformer(input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        emb = F.normalize(upcast(pool(h, attention_mask, self.config.pooling)), dim=-1)
        if emb.shape[0] % 2:
            raise ValueError(f"a contrastive batch holds pairs; got an odd batch of {emb.shape[0]}")
        a, b = emb.chunk(2)
        logits = a @ b.t() / self.config.temperature
        loss = None
        if labels is not None:
            inverse = torch.empty_like(labels)
            inverse[labels] = torch.arange(labels.numel(), device=labels.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), inverse)) / 2
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, pooled=emb)


TASK_MODELS: dict[str, type[Model]] = {
    "causal_lm": CausalLM,
    "pretraining": MaskedLM,
    "masked_lm": MaskedLM,
    "encoder": Encoder,
    "sequence_classification": SequenceClassifier,
    "image_classification": ImageClassifier,
    "masked_image_modeling": MaskedImageModel,
    "contrastive": Contrastive,
}
