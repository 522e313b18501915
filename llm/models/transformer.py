"""The Transformer trunk that every task shares: embeddings, blocks, final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.config import ModelConfig
from llm.models.layers import Block, Rotary, build_norm, dropout, sinusoidal_table


@dataclass
class ModelOutput:
    """What every model returns. `hidden_states` are the final hidden states (B, T, d);
    `pooled` is the per-sequence vector of pooling heads; `nsp_logits` the BERT
    next-sentence scores."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Each layer writes its new keys at `length` and reads everything before; the
    trunk advances `length` once all layers have run.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; step would reach {end}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Transformer(nn.Module):
    """Token (or patch) embeddings, positions, the blocks, and the final norm of pre-norm stacks."""

    def __init__(self, cfg: ModelConfig, mask_token: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.is_image:
            self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if mask_token else None
        else:
            self.tok_embed = nn.Embedding(cfg.vocab_size, d)
            if cfg.position == "learned":
                self.pos_embed = nn.Embedding(cfg.max_seq_len, d)
            elif cfg.position == "sinusoidal":
                self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, d), persistent=False)
            self.type_embed = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta) if cfg.position == "rotary" else None
        self.embed_norm = build_norm(cfg) if cfg.norm_position == "post" else None
        self.dropout = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg) if cfg.norm_position == "pre" else None
        self.gradient_checkpointing = False

    def embed_tokens(self, input_ids, token_type_ids=None, position_ids=None, cache: KVCache | None = None):
        cfg = self.cfg
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        # the range check reads values back (a graph break under torch.compile, where indexing checks instead)
        checked = input_ids.numel() and not torch.compiler.is_compiling()
        if checked and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
        t = input_ids.shape[1]
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=input_ids.device)[None]
        if cfg.position in ("learned", "sinusoidal") and int(position_ids.max()) >= cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len}")
        x = self.tok_embed(input_ids)
        if cfg.position == "learned":
            x = x + self.pos_embed(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[position_ids].to(x.dtype)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        return x, position_ids

    def embed_patches(self, pixel_values, bool_masked_pos=None):
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built for masked image modeling")
            w = bool_masked_pos.reshape(x.shape[0], -1, 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return x + self.pos_embed.to(x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.cfg.is_image:
            if pixel_values is None:
                raise ValueError("a vit model takes pixel_values (batch, channels, height, width)")
            x = self.embed_patches(pixel_values, bool_masked_pos)
            rope = None
        else:
            if input_ids is None:
                raise ValueError("a text model takes input_ids (batch, seq)")
            x, position_ids = self.embed_tokens(input_ids, token_type_ids, position_ids, cache)
            rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.to(torch.bool)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x) if self.norm is not None else x
