"""The pieces of a Transformer block: norms, positions, attention, MLP, the block.

Attention and norms go through `llm.kernels`, so a fused kernel reaches every
model without changes here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llm import kernels
from llm.models.config import ModelConfig
from llm.models.rope import rope_frequencies


def dropout(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0 (training-mode dropout at 0 still copies and masks)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension (LayerNorm's bias follows `bias`)."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.weight.numel()}, eps={self.eps}"


def build_norm(cfg: ModelConfig) -> Norm:
    return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.bias)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table.float()


class Rotary(nn.Module):
    """Rotary position embedding in the half-split layout of Hugging Face LLaMA:
    dimension i pairs with i + head_dim/2 (Su et al., 2021, RoFormer), with the
    scalings of `llm.models.rope`.

    The frequencies stay float32 under any cast of the model (`model.to(torch.bfloat16)`):
    in bf16, cos at position 4000 would be off by more than 1.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, max_seq_len: int = 2048):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_seq_len = head_dim, theta, scaling, max_seq_len
        inv_freq, self.attention_scaling = rope_frequencies(head_dim, theta, scaling, max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32:  # a cast: rebuild the table in float32 where it now lives
            inv_freq, _ = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_seq_len)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (B or 1, T, head_dim), for positions (B or 1, T); computed in float32, cast to dtype."""
        inv_freq = self.inv_freq
        if (self.scaling or {}).get("rope_type") == "dynamic":
            longest = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if longest > self.max_seq_len:
                inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_seq_len, longest)[0]
                inv_freq = inv_freq.to(self.inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles whose cos/sin are (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """How tensor parallelism cuts a linear layer's weight over N ranks (Megatron-LM: Shoeybi et al., 2019).

    `dim` 0, column-parallel: rank r keeps part r of the output features (weight rows and bias) of each of
    `pieces`, the sizes of the projections fused along them (q, k, v; gate, up; None: one), so its output
    holds whole heads of q, k and v, or the gate and up columns that pair. `dim` 1, row-parallel: rank r keeps
    part r of the input features; the bias stays whole (added once, after the ranks' outputs are summed)."""

    dim: int
    pieces: tuple[int, ...] | None = None

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank` of `size`'s part of the whole tensor `full`; ValueError when a piece does not divide."""
        pieces = full.split(list(self.pieces or [full.shape[self.dim]]), self.dim)
        if any(p.shape[self.dim] % size for p in pieces):
            raise ValueError(f"{tuple(p.shape[self.dim] for p in pieces)} do not divide into {size} parts")
        return torch.cat([p.chunk(size, self.dim)[rank] for p in pieces], self.dim)

    def of_parameters(self, bias: bool) -> dict[str, TensorSplit]:
        """{"weight": this split, "bias": its split} of the layer's parameters that it cuts."""
        return {"weight": self, **({"bias": TensorSplit(0, self.pieces)} if bias and self.dim == 0 else {})}

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor of every rank's part, in rank order (the inverse of `shard`)."""
        size = len(shards)
        local = [p // size for p in self.pieces or [shards[0].shape[self.dim] * size]]
        parts = [s.split(local, self.dim) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts], self.dim) for i in range(len(local))], self.dim)


def tensor_parallel_splits(model: nn.Module) -> dict[str, TensorSplit]:
    """{parameter name: its TensorSplit} of every parameter tensor parallelism cuts in a whole `model` (its
    layers' `tensor_parallel_plan()`); every other parameter is whole on every rank."""
    out = {}
    for prefix, module in model.named_modules():
        if not hasattr(module, "tensor_parallel_plan"):
            continue
        for name, split in module.tensor_parallel_plan().items():
            for param, cut in split.of_parameters(getattr(module, name).bias is not None).items():
                out[f"{prefix}.{name}.{param}"] = cut
    return out


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA, MQA).

    One fused projection makes q, k and v; `cache` (a KVCache) holds earlier keys
    and values during generation. `prefix` (k, v), each (B, kv_heads, n, head_dim),
    are keys and values put in front of the sequence's own (prefix tuning); they
    take no rotary angle and, with a cache, are written into it once. `document_ids`
    (B, T) keep each query inside its document of a packed row (`kernels.attention`).

    `sequence_parallel` (set by `Transformer.set_sequence_parallel`; None on one rank) is
    Ulysses sequence parallelism: x holds this rank's T/N positions, and attention runs on
    every position of H/N heads between two all-to-alls (llm.train.parallel); the masks
    given are then the whole sequence's.

    `tensor_parallel` (`set_tensor_parallel`; 1 on one rank) is the number of ranks its heads are split
    over: this rank computes n_heads / that query heads and kv_heads / that key/value heads.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = cfg.causal
        self.dropout_p = cfg.attention_dropout
        q_dim, kv_dim = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # Qwen3: RMSNorm over each head of q and k, before rotary
        self.q_norm = Norm(self.head_dim, "rmsnorm", cfg.norm_eps, False) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, "rmsnorm", cfg.norm_eps, False) if cfg.qk_norm else None
        self.sequence_parallel = None
        self.tensor_parallel = 1

    def tensor_parallel_plan(self) -> dict[str, TensorSplit]:
        """qkv column-parallel by heads (each rank's q heads with the k/v heads they read), proj row-parallel
        (of a whole layer)."""
        return {"qkv": TensorSplit(0, self.split), "proj": TensorSplit(1)}

    def set_tensor_parallel(self, tp) -> None:
        """Keep this rank's heads (`tp`: a `llm.train.tensor_parallel.TensorParallel`). The qk-norm weights,
        whole on every rank, see only this rank's heads: their gradients are summed over the group."""
        for name, split in self.tensor_parallel_plan().items():
            setattr(self, name, tp.shard(getattr(self, name), split))
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                tp.sum_gradient(norm.weight)
        self.tensor_parallel = tp.size

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache=None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([n // self.tensor_parallel for n in self.split], dim=-1)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if prefix is not None:
            k, v = torch.cat((prefix[0].to(k.dtype), k), dim=2), torch.cat((prefix[1].to(v.dtype), v), dim=2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        sp = self.sequence_parallel
        if sp is not None:
            q, k, v = sp.to_head_shards(q), sp.to_head_shards(k), sp.to_head_shards(v)
        y = kernels.attention(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            document_ids=document_ids,
        )
        if sp is not None:
            y = sp.to_sequence_shards(y)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """GELU MLP, or SwiGLU with gate and up projections fused into `fc_in` (gate first)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        width = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff
        self.fc_in = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def tensor_parallel_plan(self) -> dict[str, TensorSplit]:
        """fc_in column-parallel (the same columns of gate and up on a rank), fc_out row-parallel (of a whole MLP)."""
        d_ff = self.fc_out.in_features
        return {"fc_in": TensorSplit(0, (d_ff, d_ff) if self.kind == "swiglu" else None), "fc_out": TensorSplit(1)}

    def set_tensor_parallel(self, tp) -> None:
        """Keep this rank's part of the hidden width (`tp`: a `llm.train.tensor_parallel.TensorParallel`)."""
        for name, split in self.tensor_parallel_plan().items():
            setattr(self, name, tp.shard(getattr(self, name), split))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.fc_out(h)


class Block(nn.Module):
    """Attention then MLP, each in a residual branch, normalised before (pre) or after (post)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = build_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = dropout(cfg.dropout)

    def forward(self, x, rope=None, key_padding_mask=None, cache=None, prefix=None, document_ids=None):
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), rope, key_padding_mask, cache, prefix, document_ids))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, rope, key_padding_mask, cache, prefix, document_ids)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class LMHead(nn.Module):
    """Output projection to the vocabulary, and the token loss computed inside it.

    The loss lives in this module's forward so that ZeRO-3, which gathers a
    module's parameters around its forward, hands the fused loss the full weight.
    """

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(
        self, h: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits or None, mean loss over labels != -100 or None)."""
        loss = None
        if labels is not None:
            loss = kernels.linear_cross_entropy(h.flatten(0, -2), self.weight, labels.flatten(), bias=self.bias)
        logits = F.linear(h, self.weight, self.bias) if return_logits or labels is None else None
        return logits, loss


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for matrices and embeddings, zeros for biases, ones for norms;
    residual output projections scaled by 1/sqrt(2 * n_layers) as in GPT-2."""
    std = cfg.init_std
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("attn.proj", "mlp.fc_out")) else 1.0
            nn.init.normal_(m.weight, std=std * scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, LMHead):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Norm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
