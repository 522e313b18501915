"""LoRA: low-rank adapters beside frozen weights (Hu et al., 2021, arXiv:2106.09685).

A target linear layer W (out x in) keeps W frozen and learns A (rank x in) and
B (out x rank); it computes  y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T.
A starts as Kaiming-uniform and B as zeros, so training starts from the
unchanged model. `merge` folds (alpha / rank) * B @ A into W for export.

Settings (`LoRASettings`; recipe `adapt: {method: lora, ...}` or `transforms: [{name: lora, ...}]`):
- `rank` (8), `alpha` (16), `dropout` (0.0);
- `targets` (["q", "v"]): module names. `q`, `k`, `v` are the rows of the fused
  `attn.qkv` projection (q: n_heads * head_dim rows; k and v: kv_heads * head_dim
  each, so GQA/MQA work); `gate` and `up` the halves of a SwiGLU `mlp.fc_in`;
  `qkv`, `proj`, `fc_in`, `fc_out`, `classifier`, `lm_head`, `dense` a whole
  layer; any other entry is a module path or its suffix
  (`transformer.blocks.0.attn.qkv`, `blocks.3.mlp.fc_out`, `pooler.dense`), also
  with a slice (`blocks.0.attn.q`). An entry that matches nothing is an error;
- `trainable` ([]): modules or parameters that train in full beside the adapters
  (a new classification head: `[classifier]`).
Everything else is frozen. The adapter tensors are parameters of the layer they
adapt (`lora_A`, `lora_B`, or `lora_A_q`, `lora_B_q` per slice), so ZeRO-3 gathers
them with the layer's weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from llm import kernels
from llm.adapt.base import Transform
from llm.adapt.freeze import freeze_base, trainable_params
from llm.config import ConfigError
from llm.models.base import Model, tied_aliases
from llm.models.layers import LMHead, dropout

SLICES = {"attn.qkv": ("q", "k", "v"), "mlp.fc_in": ("gate", "up")}
WHOLE = ("qkv", "proj", "fc_in", "fc_out", "classifier", "lm_head", "dense")


@dataclasses.dataclass
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    trainable: list[str] = dataclasses.field(default_factory=list)

    def validate(self, path: str) -> None:
        if self.rank < 1:
            raise ConfigError(f"{path}.rank", f"must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{path}.alpha", f"must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{path}.targets", "names no module to adapt")


def slices_of(model: Model, name: str) -> dict[str, tuple[int, int]]:
    """The named row ranges of layer `name`: q/k/v of a fused qkv, gate/up of a SwiGLU fc_in."""
    cfg = model.config
    if name.endswith("attn.qkv"):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if name.endswith("mlp.fc_in") and cfg.mlp == "swiglu":
        return {"gate": (0, cfg.d_ff), "up": (cfg.d_ff, 2 * cfg.d_ff)}
    return {}


class LoRAMixin:
    """What LoRALinear and LoRALMHead share: the adapter pairs over row ranges of the output."""

    def add_adapters(self, ranges: dict[str, tuple[int, int]], rank: int, alpha: float, p: float) -> None:
        self.lora_ranges = dict(ranges)  # slice name ("" = the whole output) -> (start, end)
        self.lora_rank, self.lora_alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = dropout(p)
        w = self.weight
        for key, (start, end) in self.lora_ranges.items():
            a = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises, and PEFT's LoRA A
            setattr(self, _param("A", key), a)
            setattr(
                self, _param("B", key), nn.Parameter(torch.zeros(end - start, rank, dtype=w.dtype, device=w.device))
            )

    def lora_pairs(self):
        """(slice name, (start, end), A, B) for each adapter of this layer."""
        for key, rows in self.lora_ranges.items():
            yield key, rows, getattr(self, _param("A", key)), getattr(self, _param("B", key))

    def add_lora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (..., out) of the frozen layer plus scaling * dropout(x) A^T B^T on each adapter's rows."""
        xd = self.lora_dropout(x)
        for key, (start, end), a, b in self.lora_pairs():
            delta = F.linear(F.linear(xd, a), b) * self.scaling
            if not key:
                return out + delta
            out[..., start:end] += delta  # in place: F.linear's backward does not need its output
        return out

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A placed in its rows, (out, in), in fp32."""
        delta = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        for _, (start, end), a, b in self.lora_pairs():
            delta[start:end] += self.scaling * (b.float() @ a.float())
        return delta

    def drop_adapters(self) -> None:
        for key in list(self.lora_ranges):
            delattr(self, _param("A", key))
            delattr(self, _param("B", key))
        for attr in ("lora_ranges", "lora_rank", "lora_alpha", "scaling", "lora_dropout"):
            delattr(self, attr)


def _param(which: str, key: str) -> str:
    return f"lora_{which}_{key}" if key else f"lora_{which}"


class LoRALinear(LoRAMixin, nn.Linear):
    """nn.Linear plus adapters; its weight and bias keep their names (and their frozen values)."""

    plain = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(F.linear(x, self.weight, self.bias), x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora: {', '.join(k or 'all' for k in self.lora_ranges)} r={self.lora_rank}"


class LoRALMHead(LoRAMixin, LMHead):
    """The output projection plus an adapter. The loss stays fused: [h, s*dropout(h)A^T] times
    [W, B]^T equals h W^T + s*dropout(h)A^T B^T, so no (tokens x vocab) logits are needed."""

    plain = LMHead

    def forward(self, h, labels=None, return_logits=True):
        ((_, _, a, b),) = self.lora_pairs()
        low = F.linear(self.lora_dropout(h), a) * self.scaling
        loss = None
        if labels is not None:
            joined = torch.cat((h, low), dim=-1).flatten(0, -2)
            loss = kernels.linear_cross_entropy(
                joined, torch.cat((self.weight, b), dim=1), labels.flatten(), bias=self.bias
            )
        logits = None
        if return_logits or labels is None:
            logits = F.linear(h, self.weight, self.bias) + F.linear(low, b)
        return logits, loss


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LMHead))


def _candidates(model: Model) -> list[str]:
    short = []
    for name, module in model.named_modules():
        if _adaptable(module):
            short += [*slices_of(model, name), name.rsplit(".", 1)[-1]]
    return sorted(set(short), key=short.index)


def _resolve(model: Model, target: str, where: str) -> dict[str, list[str]]:
    """{module name: [slice names]} that `target` selects ("" = the whole layer)."""
    hits: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not _adaptable(module):
            continue
        if name == target or name.endswith("." + target):
            hits[name] = [""]
            continue
        head, _, piece = target.rpartition(".")  # "blocks.0.attn.q": the q rows of blocks.0.attn's qkv
        parent = name.rpartition(".")[0]
        if piece in slices_of(model, name) and (not head or parent == head or parent.endswith("." + head)):
            hits[name] = [piece]
    if not hits:
        raise ConfigError(
            where,
            f"{target!r} matches no linear layer of this {model.task} model; candidates: "
            f"{', '.join(_candidates(model))}, or a module path such as transformer.blocks.0.attn.qkv",
        )
    return hits


def _rows(model: Model, name: str, pieces: list[str]) -> dict[str, tuple[int, int]]:
    """The row ranges of layer `name` that `pieces` adapt ("" = all its rows)."""
    if pieces == [""]:
        return {"": (0, model.get_submodule(name).weight.shape[0])}
    return {p: slices_of(model, name)[p] for p in pieces}


def apply(model: Model, s: LoRASettings, path: str = "lora") -> Model:
    """Add adapters to the layers `targets` names and freeze the rest; see the module docstring.

    Raises ConfigError naming `path` for a target matching no layer, two targets overlapping in
    one layer, a rank above min(out, in) of every layer it adapts (one that no layer can use, which
    would only allocate), or an output projection tied to the token embedding."""
    chosen: dict[str, list[str]] = {}
    for i, target in enumerate(s.targets):
        for name, pieces in _resolve(model, target, f"{path}.targets[{i}]").items():
            have = chosen.setdefault(name, [])
            if "" in have + pieces and have:
                raise ConfigError(f"{path}.targets[{i}]", f"{target!r} overlaps another target on {name}")
            have += [p for p in pieces if p not in have]
    full_rank = max(  # of the largest (rows x in) matrix adapted
        min(end - start, model.get_submodule(name).weight.shape[1])
        for name, pieces in chosen.items()
        for start, end in _rows(model, name, pieces).values()
    )
    if s.rank > full_rank:
        raise ConfigError(f"{path}.rank", f"{s.rank} exceeds the rank of every layer it adapts (at most {full_rank})")
    extra = trainable_params(model, s.trainable, path)
    tied = tied_aliases(model)
    freeze_base(model)
    for name, pieces in chosen.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRAMixin):
            raise ConfigError(f"{path}.targets", f"{name} already carries a LoRA adapter")
        if isinstance(module, LMHead) and any(n.startswith(name + ".") for n in tied):
            raise ConfigError(
                f"{path}.targets",
                f"{name} shares its weight with the token embedding (tie_embeddings); an adapter on it "
                "could not be merged",
            )
        rows = _rows(model, name, pieces)
        module.__class__ = LoRALMHead if isinstance(module, LMHead) else LoRALinear
        module.add_adapters(rows, s.rank, s.alpha, s.dropout)
    for p in extra:
        p.requires_grad_(True)
    return model


TRANSFORM = Transform("lora", LoRASettings, apply, training_only=("dropout", "trainable"))


def adapted_layers(model: nn.Module) -> list[tuple[str, LoRAMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAMixin)]


@contextlib.contextmanager
def _whole(params: list[nn.Parameter]):
    """Full tensors of ZeRO-3 partitioned parameters (rank 0's changes kept); others as they are."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


@torch.no_grad()
def merge(model: Model) -> Model:
    """Fold every adapter into its weight (W += alpha/rank * B @ A, in fp32), remove the adapters
    and drop the lora record from `model.transforms`; the model then computes the same function
    with plain layers and exports like any other. In place; returns `model`.

    Under ZeRO-3 each layer's partitioned weight and adapters are gathered for the fold (all
    ranks must call). Raises ValueError when the model carries no adapter."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapter to merge")
    for _, module in layers:
        params = [module.weight] + [t for _, _, a, b in module.lora_pairs() for t in (a, b)]
        with _whole(params):
            merged = module.weight.float() + module.delta_weight()
            module.weight.copy_(merged.to(module.weight.dtype))
        module.drop_adapters()
        module.__class__ = module.plain
    model.transforms = [t for t in model.transforms if t["name"] != "lora"]
    return model
