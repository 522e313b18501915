"""The Transformer trunk that every task shares: embeddings, blocks, final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def check_token_labels(labels: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    """Per-token labels must be integer and shaped like input_ids (B, T); raises ValueError/TypeError."""
    if labels is None:
        return
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids (-100: no loss), got {labels.dtype}")


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
        rotary = cfg.position == "rotary"
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len) if rotary else None
        self.embed_norm = build_norm(cfg) if cfg.norm_position == "post" else None
        self.dropout = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg) if cfg.norm_position == "pre" else None
        self.gradient_checkpointing = False

    def embed_tokens(self, input_ids, token_type_ids=None, position_ids=None, cache: KVCache | None = None):
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
        t = input_ids.shape[1]
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + t, device=input_ids.device)[None]
        elif position_ids.shape[-1] != t or position_ids.dim() != 2 or position_ids.shape[0] not in (1, len(input_ids)):
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not fit input_ids {tuple(input_ids.shape)}")
        if cfg.position in ("learned", "sinusoidal") and t and int(position_ids.max()) >= cfg.max_seq_len:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len} "
                f"(a sequence of at most {cfg.max_seq_len} tokens)"
            )
        x = self.tok_embed(input_ids)
        if cfg.position == "learned":
            x = x + self.pos_embed(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[position_ids].to(x.dtype)
        if token_type_ids is not None:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            if token_type_ids.numel() and (
                int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= max(cfg.type_vocab_size, 1)
            ):
                raise ValueError(
                    f"token type {int(token_type_ids.max())} is outside [0, {max(cfg.type_vocab_size, 1)}) "
                    f"(model.type_vocab_size={cfg.type_vocab_size})"
                )
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        return x, position_ids

    def embed_patches(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding: bool = False):
        """Patch embeddings with [CLS] and positions. Images must be the config's size, or any size
        with `interpolate_pos_encoding` (the position grid resized bicubically, as Hugging Face ViT and
        DINO do: Caron et al., 2021)."""
        cfg = self.cfg
        if pixel_values.dim() != 4 or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be float (batch, channels, height, width), got {pixel_values.dtype} "
                f"of shape {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values have {channels} channels, the model {cfg.num_channels} (num_channels)")
        if (height, width) != (cfg.image_size, cfg.image_size):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"image size {height}x{width} does not match the model's {cfg.image_size}x{cfg.image_size} "
                    "(image_size); resize it, or pass interpolate_pos_encoding=True"
                )
            if height < cfg.patch_size or width < cfg.patch_size:
                raise ValueError(f"image size {height}x{width} is smaller than one patch ({cfg.patch_size})")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built for masked image modeling")
            if bool_masked_pos.numel() != x.shape[0] * x.shape[1]:
                raise ValueError(
                    f"bool_masked_pos {tuple(bool_masked_pos.shape)} must hold one flag per patch "
                    f"({x.shape[0]}, {x.shape[1]})"
                )
            w = bool_masked_pos.reshape(x.shape[0], -1, 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        pos = self.pos_embed
        if (height, width) != (cfg.image_size, cfg.image_size):
            pos = self.resized_positions(height // cfg.patch_size, width // cfg.patch_size)
        return x + pos.to(x.dtype)

    def resized_positions(self, rows: int, cols: int) -> torch.Tensor:
        """The learned position grid, bicubically resized to rows x cols patches; [CLS]'s kept (1, 1 + rows*cols, d)."""
        side, d = self.cfg.image_size // self.cfg.patch_size, self.cfg.d_model
        grid = self.pos_embed[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, d)), dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (B, T, d_model) of input_ids (B, T) or pixel_values (B, C, H, W).

        Every input is checked against the config first; a mismatch raises ValueError (TypeError
        for a wrong dtype) naming the input, its shape and the config field it contradicts."""
        if self.cfg.is_image:
            if pixel_values is None:
                raise ValueError("a vit model takes pixel_values (batch, channels, height, width)")
            x = self.embed_patches(pixel_values, bool_masked_pos, interpolate_pos_encoding)
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
        if attention_mask is not None:
            past = cache.length if cache is not None else 0
            if attention_mask.shape != (x.shape[0], past + x.shape[1]):
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = "
                    f"({x.shape[0]}, {past + x.shape[1]})"
                )
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
