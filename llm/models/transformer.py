"""The Transformer trunk that every task shares: embeddings, blocks, final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.models.config import ModelConfig
from llm.models.layers import Block, Rotary, build_norm, dropout, sinusoidal_table


def _reads_values() -> bool:
    """Whether the input checks may read tensor values back: not while torch.compile or torch.export
    traces (a graph break under compile, a failed export), where indexing checks instead."""
    return not torch.compiler.is_compiling()


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
    """Keys and values of every layer, for up to `max_len` positions.

    Each layer writes its new keys at `length` and reads everything before; the
    trunk advances `length` once all layers have run. A layer's buffer is
    allocated at its first write, with that layer's number of key/value heads
    (structured pruning may leave layers with different counts). `virtual` counts the
    positions at the front that hold no input token (a prefix or a soft prompt).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.batch, self._max_len, self.dtype, self.device = batch, max_len, dtype, device
        self.length = 0
        self.virtual = 0

    @property
    def max_len(self) -> int:
        return self._max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; step would reach {end}")
        if self.k[layer] is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Transformer(nn.Module):
    """Token (or patch) embeddings, positions, the blocks, and the final norm of pre-norm stacks.

    Two optional slots hold virtual tokens that a transform (llm.adapt) installs:
    `prompt`, a module whose forward(batch) gives (B, n, d) embeddings put before
    the input's (prompt tuning: they take positions 0..n-1 and the input's shift by
    n), and `prefix`, a module whose forward(batch) gives one (k, v) pair per layer,
    each (B, kv_heads, n, head_dim), put before every layer's keys and values
    (prefix tuning: the input keeps positions from 0). Either way the returned
    hidden states are the input tokens' only, so heads, labels and pooling are
    unchanged, and `attention_mask` covers the input tokens only.

    A third slot, `sequence_parallel` (`set_sequence_parallel`), splits every sequence over
    the ranks of a sequence-parallel group (Ulysses, llm.train.parallel): the inputs are this
    rank's consecutive T/N positions, masks and document ids are gathered to the whole
    sequence once per forward, and each attention layer exchanges heads for positions.
    """

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
        self.prompt: nn.Module | None = None
        self.prefix: nn.Module | None = None
        self.sequence_parallel = None

    def set_sequence_parallel(self, sequence_parallel) -> None:
        """Split sequences over a sequence-parallel group: `sequence_parallel` is a
        `llm.train.parallel.SequenceParallel` (its rank, size and exchanges), None for one rank."""
        self.sequence_parallel = sequence_parallel
        for block in self.blocks:
            block.attn.sequence_parallel = sequence_parallel

    def set_tensor_parallel(self, tensor_parallel) -> None:
        """Split every block's attention heads and MLP width over a tensor-parallel group: `tensor_parallel`
        is a `llm.train.tensor_parallel.TensorParallel` (its rank, size and parallel linears). Everything
        outside the blocks' linears stays whole on every rank."""
        for block in self.blocks:
            block.attn.set_tensor_parallel(tensor_parallel)
            block.mlp.set_tensor_parallel(tensor_parallel)

    @property
    def num_virtual_tokens(self) -> int:
        """Keys in front of the input's: the soft prompt's or the prefix's length (0 without)."""
        slot = self.prompt if self.prompt is not None else self.prefix
        return int(slot.num_virtual_tokens) if slot is not None else 0

    @property
    def virtual_positions(self) -> int:
        """Positions the soft prompt takes before the input's (a prefix takes none)."""
        return int(self.prompt.num_virtual_tokens) if self.prompt is not None else 0

    def embed_tokens(
        self,
        input_ids,
        token_type_ids=None,
        position_ids=None,
        cache: KVCache | None = None,
        inputs_embeds=None,
        prompt=None,
    ):
        """Word + position (+ token type) embeddings of (B, T) ids, or of `inputs_embeds` (B, T, d)
        word embeddings; `prompt` (B, n, d) goes in front with positions 0..n-1. Returns (x, positions)."""
        cfg = self.cfg
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
            if (
                input_ids.numel()
                and _reads_values()
                and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size)
            ):
                bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
                raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
            x = self.tok_embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.d_model:
                raise ValueError(
                    f"inputs_embeds must be (batch, seq, d_model={cfg.d_model}), got {tuple(inputs_embeds.shape)}"
                )
            x = inputs_embeds
        b, t = x.shape[:2]
        given = f"{'input_ids' if inputs_embeds is None else 'inputs_embeds'} ({b}, {t})"
        if position_ids is None:
            start = cache.length - cache.virtual if cache is not None and cache.length else 0
            if self.sequence_parallel is not None:  # this rank's slice of the sequence
                start = self.sequence_parallel.rank * t
            position_ids = torch.arange(start, start + t, device=x.device)[None]
        elif position_ids.dim() != 2 or position_ids.shape[-1] != t or position_ids.shape[0] not in (1, b):
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not fit {given}")
        position_ids = position_ids + self.virtual_positions
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != (b, t):
                raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match {given}")
            if (
                token_type_ids.numel()
                and _reads_values()
                and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= max(cfg.type_vocab_size, 1))
            ):
                raise ValueError(
                    f"token type {int(token_type_ids.max())} is outside [0, {max(cfg.type_vocab_size, 1)}) "
                    f"(model.type_vocab_size={cfg.type_vocab_size})"
                )
        elif self.type_embed is not None:
            token_type_ids = torch.zeros((b, t), dtype=torch.int64, device=x.device)
        if prompt is not None:
            n = prompt.shape[1]
            front = torch.arange(n, device=x.device)[None].expand(position_ids.shape[0], -1)
            position_ids = torch.cat((front, position_ids), dim=1)
            x = torch.cat((prompt.to(x.dtype), x), dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat((token_type_ids.new_zeros((b, n)), token_type_ids), dim=1)
        if (
            cfg.position in ("learned", "sinusoidal")
            and position_ids.numel()
            and _reads_values()
            and int(position_ids.max()) >= cfg.max_seq_len
        ):
            virtual = f", {self.virtual_positions} of them a soft prompt's" if self.virtual_positions else ""
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_seq_len={cfg.max_seq_len} "
                f"(a sequence of at most {cfg.max_seq_len} tokens{virtual})"
            )
        if cfg.position == "learned":
            x = x + self.pos_embed(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + self.pos_table[position_ids].to(x.dtype)
        if self.type_embed is not None:
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
        inputs_embeds: torch.Tensor | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        interpolate_pos_encoding: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, d_model) of input_ids (B, T) or pixel_values (B, C, H, W).

        `inputs_embeds` (B, T, d) replaces the word embeddings of `input_ids`;
        `prefix` gives per-layer (k, v) prefixes (else the `prefix` slot does);
        `position_ids` (B or 1, T) number the input tokens, from 0 by default; `document_ids`
        (B, T) integer name the document of each token of packed rows (a run of equal ids is
        one document), which attention does not cross (give position_ids restarting at each
        document for the positions a document gets alone). Every input is checked against the
        config first; a mismatch raises ValueError (TypeError for a wrong dtype) naming the
        input, its shape and the config field it contradicts."""
        fresh = cache is None or cache.length == 0  # virtual tokens enter now (later they sit in the cache)
        batch = next((t.shape[0] for t in (input_ids, inputs_embeds, pixel_values) if t is not None), 0)
        if prefix is None and self.prefix is not None and fresh:
            prefix = self.prefix(batch)
        n_prefix = prefix[0][0].shape[2] if prefix is not None else 0
        prompt = self.prompt(batch) if self.prompt is not None and fresh else None
        sp = self.sequence_parallel
        if (document_ids is not None or sp is not None) and (
            cache is not None or prefix is not None or prompt is not None or self.cfg.is_image
        ):
            what = "document_ids" if document_ids is not None else "sequence parallelism"
            raise ValueError(f"{what}: needs a text model without a KV cache, a soft prompt or a prefix")
        if self.cfg.is_image:
            if pixel_values is None:
                raise ValueError("a vit model takes pixel_values (batch, channels, height, width)")
            if prompt is not None:
                raise ValueError("a soft prompt needs a text model")
            x = self.embed_patches(pixel_values, bool_masked_pos, interpolate_pos_encoding)
            rope = None
        else:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("a text model takes input_ids (batch, seq) or inputs_embeds (batch, seq, d_model)")
            x, position_ids = self.embed_tokens(input_ids, token_type_ids, position_ids, cache, inputs_embeds, prompt)
            rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        mask = None
        if attention_mask is not None:
            past = cache.length - cache.virtual if cache is not None else 0  # input tokens seen before
            inputs = x.shape[1] - (prompt.shape[1] if prompt is not None else 0)
            if attention_mask.shape != (x.shape[0], past + inputs):
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must be (batch, seq) = "
                    f"({x.shape[0]}, {past + inputs})"
                )
        if document_ids is not None and tuple(document_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"document_ids {tuple(document_ids.shape)} must be (batch, seq) = {tuple(x.shape[:2])}")
        if sp is not None:  # attention sees the whole sequence
            attention_mask = sp.gather_sequence(attention_mask) if attention_mask is not None else None
            document_ids = sp.gather_sequence(document_ids) if document_ids is not None else None
        # an exported graph serves every mask, so it always takes the masked path (equal for a mask of ones)
        if attention_mask is not None and (torch.compiler.is_exporting() or not bool(attention_mask.all())):
            mask = attention_mask.to(torch.bool)
            virtual = (
                self.num_virtual_tokens if not fresh else n_prefix + (prompt.shape[1] if prompt is not None else 0)
            )
            if virtual:  # virtual tokens are always attended to
                mask = torch.cat((mask.new_ones((mask.shape[0], virtual)), mask), dim=1)
        for i, block in enumerate(self.blocks):
            layer_prefix = prefix[i] if prefix is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, cache, layer_prefix, document_ids, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, layer_prefix, document_ids)
        if cache is not None:
            cache.length += x.shape[1] + n_prefix
            if fresh:
                cache.virtual = n_prefix + (prompt.shape[1] if prompt is not None else 0)
        if prompt is not None:
            x = x[:, prompt.shape[1] :]
        return self.norm(x) if self.norm is not None else x
