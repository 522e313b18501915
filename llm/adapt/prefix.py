"""Prefix tuning: learned keys and values in front of every layer's (Li & Liang, 2021,
arXiv:2101.00190). The model itself is frozen.

Each layer attends to `num_virtual_tokens` extra keys and values of its own,
shaped (kv_heads, n, head_dim) like the layer's keys, so GQA and MQA models work.
They take no rotary angle and no position: the input's tokens keep positions
0.. as without a prefix (as Hugging Face PEFT's prefix tuning does), padding
masks cover the input only, and with a KV cache the prefix is written once, in
front of the generated keys.

Settings (`PrefixSettings`; recipe `adapt: {method: prefix, ...}` or `transforms: [{name: prefix, ...}]`):
- `num_virtual_tokens` (required): prefix length n, below the model's max_seq_len;
- `reparameterize` (false): learn the prefix through a two-layer tanh MLP of a
  small embedding (the paper's stabilised parameterisation); `export` folds the
  MLP's output into a plain prefix, which then loads without the MLP;
- `hidden_size` (d_model): the MLP's hidden width;
- `init` ("vocab"): start from the keys and values that n random vocabulary
  tokens produce in the frozen model (the paper's initialisation from real
  activations), or "random" (normal, std init_std). With `reparameterize` the
  start is random;
- `trainable` ([]): modules that train in full beside the prefix (a new
  classification head: `[classifier]`, as PEFT's modules_to_save).

The prefix lives in `model.transformer.prefix` (a `Prefix` module; its forward
gives the per-layer (k, v)); its state-dict names are `transformer.prefix.*`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from llm.adapt.base import Transform
from llm.adapt.freeze import freeze_base, trainable_params
from llm.config import ConfigError
from llm.models.base import Model
from llm.models.transformer import KVCache


@dataclasses.dataclass
class PrefixSettings:
    num_virtual_tokens: int = 0
    reparameterize: bool = False
    hidden_size: int | None = None
    init: Literal["vocab", "random"] = "vocab"
    trainable: list[str] = dataclasses.field(default_factory=list)

    def validate(self, path: str) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{path}.num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ConfigError(f"{path}.hidden_size", f"must be >= 1, got {self.hidden_size}")


class Prefix(nn.Module):
    """Per-layer (k, v) prefixes: an (n, layers * 2 * kv_heads * head_dim) table, or that table
    computed by embedding -> Linear -> tanh -> Linear when reparameterized."""

    def __init__(self, cfg, n: int, hidden: int | None):
        super().__init__()
        self.num_virtual_tokens = n
        self.layers, self.kv_heads, self.head_dim = cfg.n_layers, cfg.kv_heads, cfg.head_dim
        width = cfg.n_layers * 2 * cfg.kv_heads * cfg.head_dim
        if hidden:
            self.embedding = nn.Embedding(n, cfg.d_model)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(n, width)
            self.mlp = None

    def table(self) -> torch.Tensor:
        """(n, layers * 2 * kv_heads * head_dim): every layer's keys then values, per virtual token."""
        ids = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device)
        x = self.embedding(ids)
        return self.mlp(x) if self.mlp is not None else x

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_virtual_tokens
        t = self.table().view(n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return [
            (t[i, 0][None].expand(batch, -1, -1, -1), t[i, 1][None].expand(batch, -1, -1, -1))
            for i in range(self.layers)
        ]


@torch.no_grad()
def _activations(model: Model, n: int) -> torch.Tensor:
    """The (n, layers * 2 * kv_heads * head_dim) keys and values of n random tokens in `model`."""
    cfg = model.config
    w = next(model.parameters())
    if cfg.is_image:
        raise ValueError("vocab init needs a text model")
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=w.device)
    cache = KVCache(cfg, 1, n, w.dtype, w.device)
    was = model.training
    model.eval()
    model.transformer(ids, cache=cache)
    model.train(was)
    keys, values = torch.stack([k[0] for k in cache.k]), torch.stack([v[0] for v in cache.v])
    kv = torch.stack((keys, values), dim=1)  # (layers, 2, kv_heads, n, head_dim)
    return kv.permute(3, 0, 1, 2, 4).reshape(n, -1)


def apply(model: Model, s: PrefixSettings, path: str = "prefix") -> Model:
    """Freeze the model and give its trunk a trainable prefix; see the module docstring.

    Raises ConfigError naming `path` for a prefix that does not fit the model's context
    (num_virtual_tokens >= max_seq_len), vocab init on an image model, or a trunk that already
    carries virtual tokens."""
    cfg, trunk = model.config, model.transformer
    if trunk.prompt is not None or trunk.prefix is not None:
        raise ConfigError(path, "the model already carries a prefix or soft prompt")
    limit = cfg.seq_len if cfg.is_image else cfg.max_seq_len
    if s.num_virtual_tokens >= limit:
        raise ConfigError(
            f"{path}.num_virtual_tokens",
            f"{s.num_virtual_tokens} virtual tokens leave no room in the model's {limit} positions "
            f"(max_seq_len); use fewer than {limit}",
        )
    if s.init == "vocab" and cfg.is_image and not s.reparameterize:
        raise ConfigError(f"{path}.init", "'vocab' needs a text model; use init: random")
    extra = trainable_params(model, s.trainable, path)
    freeze_base(model)
    for p in extra:
        p.requires_grad_(True)
    w = next(model.parameters())
    prefix = Prefix(cfg, s.num_virtual_tokens, (s.hidden_size or cfg.d_model) if s.reparameterize else None)
    prefix.to(device=w.device, dtype=w.dtype)
    if s.reparameterize:
        nn.init.normal_(prefix.embedding.weight, std=cfg.init_std)
    elif s.init == "vocab" and not w.is_meta:  # on the meta device (the loader's dry run) there are no values
        prefix.embedding.weight.data.copy_(_activations(model, s.num_virtual_tokens))
    else:
        nn.init.normal_(prefix.embedding.weight, std=cfg.init_std)
    trunk.prefix = prefix
    return model


TRANSFORM = Transform("prefix", PrefixSettings, apply, training_only=("init", "trainable"))


@torch.no_grad()
def fold(model: Model) -> Model:
    """Replace a reparameterized prefix by the table its MLP computes, and record it as plain.

    In place; returns `model`. A plain prefix is left as it is."""
    prefix = model.transformer.prefix
    if prefix is None or prefix.mlp is None:
        return model
    table = prefix.table()
    plain = Prefix(model.config, prefix.num_virtual_tokens, None).to(device=table.device, dtype=table.dtype)
    plain.embedding.weight.copy_(table)
    plain.embedding.weight.requires_grad_(False)
    model.transformer.prefix = plain
    for record in model.transforms:
        if record["name"] == "prefix":
            record.update(reparameterize=False, hidden_size=None, init="random")
    return model
