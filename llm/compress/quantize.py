"""Post-training weight quantization through torchao, as a model transform that survives a save.

Methods (`method:` of the `quantize` transform):
- "int8": weight-only int8, symmetric, one scale per output channel (torchao `Int8WeightOnlyConfig`);
- "int8-dynamic": int8 weights per output channel and int8 activations quantized per token at run
  time, for CPU inference (`Int8DynamicActivationInt8WeightConfig`);
- "int4": weight-only int4, symmetric, with one fp16 scale per group of `group_size` input columns
  (`IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
  scale_dtype=torch.float16)`; fp16 scales, as GPTQ/AWQ checkpoints store them, keep the file >= 6x
  smaller than fp32 at group 32).

What is quantized: every `nn.Linear`, the language-model head, and every `nn.Embedding` (lookups
gather rows of the quantized table; embeddings use the weight-only scheme of the method, since
activation quantization means nothing for a lookup). A head tied to the token embedding stays tied:
the head is quantized once and the embedding looks its rows up in the same quantized tensor, so the
table is stored once. Biases and norms stay in floating point.

Saving: torchao's tensor subclasses are not safetensors. `plain_tensors` (this transform's
`save_state`) stores each quantized weight W as plain tensors `W.qdata` (int8; int4 packed two values
per byte into uint8, low nibble first), `W.scale` and `W.zero_point`; the loader rebuilds the model,
re-applies this transform (which builds the same quantized modules) and `load_quantized` (its
`load_state`) copies those tensors back in, so outputs after a reload are bit-identical.
References: Jacob et al. 2018 (integer quantization), torchao docs.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from llm.adapt.base import Transform
from llm.config import ConfigError
from llm.errors import UserError
from llm.models.base import Model
from llm.models.layers import LMHead

METHODS = ("int8", "int4", "int8-dynamic")
PARTS = ("qdata", "scale", "zero_point")


@dataclasses.dataclass
class QuantizeSettings:
    """The `quantize` transform's settings (`llm compress quantize` writes them)."""

    method: str = "int8"
    group_size: int = 32  # int4 only: input columns sharing one scale and zero point

    def validate(self, path: str) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"{path}.method", f"expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ConfigError(f"{path}.group_size", f"expected a positive even number, got {self.group_size}")


def _torchao():
    """torchao.quantization, imported quietly: on a CPU-only torch its optional CUDA extensions fail
    to load, and it says so at warning level on every import (harmless here)."""
    import logging

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as q
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return q


def _configs(s: QuantizeSettings):
    """(config for Linear layers and the head, config for embedding tables)."""
    q = _torchao()
    if s.method == "int4":
        cfg = q.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=q.PerGroup(s.group_size), scale_dtype=torch.float16
        )
        return cfg, cfg
    if s.method == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(), q.Int8WeightOnlyConfig()
    return q.Int8WeightOnlyConfig(), q.Int8WeightOnlyConfig()


def is_quantized(t: torch.Tensor) -> bool:
    """Whether `t` is one of torchao's quantized tensors (it carries qdata, scale and zero_point)."""
    return all(hasattr(t, p) for p in PARTS) and type(t).__module__.startswith("torchao")


def apply(model: Model, s: QuantizeSettings, path: str = "quantize") -> Model:
    """Quantize the model in place (see the module docstring); its weights stop training.

    Raises ConfigError naming `path` when the model is quantized already or a group size does not
    divide a layer's input width."""
    if any(is_quantized(p) for p in model.parameters()):
        raise ConfigError(path, "the model is already quantized")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, LMHead, nn.Embedding))]
    if s.method == "int4":
        for name, m in targets:
            width = m.weight.shape[1]
            if width % s.group_size:
                raise ConfigError(f"{path}.group_size", f"{s.group_size} does not divide {name}'s width {width}")
    owners = {}  # id(weight) -> the one module whose weight is quantized; tied weights are quantized once
    for _, m in targets:
        # the head owns a tied table, so that its matmul runs on the quantized tensor
        if id(m.weight) not in owners or isinstance(m, LMHead):
            owners[id(m.weight)] = m
    ties = [(m, owners[id(m.weight)]) for _, m in targets if owners[id(m.weight)] is not m]
    leaders = {id(m) for m in owners.values()}
    linear_cfg, embed_cfg = _configs(s)
    q = _torchao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(model, linear_cfg, filter_fn=lambda m, _: id(m) in leaders and not isinstance(m, nn.Embedding))
        q.quantize_(model, embed_cfg, filter_fn=lambda m, _: id(m) in leaders and isinstance(m, nn.Embedding))
    for follower, owner in ties:
        follower.weight = owner.weight
    return model


# ----------------------------------------------------------------------------
# Plain tensors for safetensors, and back
# ----------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with two values per byte (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(q.shape)}")
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 (..., n) -> int8 (..., 2n) in [-8, 7]."""
    p = p.to(torch.int16)
    nibbles = torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def _is_int4(t: torch.Tensor) -> bool:
    return getattr(t, "target_dtype", None) == torch.int4


def plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a state dict) with each quantized weight W replaced by the plain tensors W.qdata
    (int4 packed), W.scale and W.zero_point; everything else as it is."""
    out = {}
    for name, t in state.items():
        if is_quantized(t):
            qdata = pack_int4(t.qdata) if _is_int4(t) else t.qdata
            out.update({f"{name}.{part}": v for part, v in zip(PARTS, (qdata, t.scale, t.zero_point))})
        else:
            out[name] = t
    return out


@torch.no_grad()
def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, set[str]]:
    """Copy the W.qdata / W.scale / W.zero_point entries of `tensors` into the model's quantized weights.

    Returns (the other tensors, the state-dict names of the quantized weights, tied aliases included).
    Raises UserError naming `where` when a part is missing or has another shape."""
    tensors = dict(tensors)
    for name, p in model.named_parameters():
        if not is_quantized(p):
            continue
        for part in PARTS:
            key = f"{name}.{part}"
            if key not in tensors:
                raise UserError(f"{where}: {key} missing (the model's config records a quantized {name})")
            value = tensors.pop(key)
            if part == "qdata" and _is_int4(p):
                value = unpack_int4(value)
            target = getattr(p, part)
            if value.shape != target.shape:
                raise UserError(
                    f"{where}: {key} has shape {tuple(value.shape)}, the quantized model needs {tuple(target.shape)}"
                )
            target.copy_(value)
    return tensors, {name for name, p in model.named_parameters(remove_duplicate=False) if is_quantized(p)}


TRANSFORM = Transform("quantize", QuantizeSettings, apply, save_state=plain_tensors, load_state=load_quantized)
