"""Post-training weight quantization, as a model transform that survives a save.

Methods (`method:` of the `quantize` transform), each computed as torchao computes it, bit for bit (`Grid`;
tests/compress/test_gptq.py compares with torchao), and run on llm's kernels (llm/compress/quantized.py):
- "int8": weight-only int8, symmetric, one scale per output channel (torchao's `Int8WeightOnlyConfig`);
- "int8-dynamic": the int8 weights, and activations quantized to int8 per token at run time, for encoders and
  classifiers on a CPU (`Int8DynamicActivationInt8WeightConfig`);
- "int4": weight-only int4, symmetric, with one fp16 scale per group of `group_size` input columns
  (`IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size), scale_dtype=torch.float16)`;
  fp16 scales, as GPTQ/AWQ checkpoints store them, keep the file >= 6x smaller than fp32 at group 32).

What is quantized: every `nn.Linear`, the language-model head, and every `nn.Embedding` (lookups dequantize the
rows they gather; activation quantization means nothing for a lookup). A head tied to the token embedding stays
tied: one quantized weight serves both, stored once. Biases and norms stay in floating point.

Saving: a quantized weight's state dict is the file's layout, plain tensors `W.qdata` (int8; int4 packed two
values per byte into uint8, low nibble first), `W.scale` and `W.zero_point` (llm/compress/quantized.py). The
loader rebuilds the model, re-applies this transform (which builds the same modules) and `load_quantized`
(its `load_state`) copies those tensors in, so outputs after a reload are bit-identical.
References: Jacob et al. 2018 (integer quantization); torchao's quantization primitives.

`Grid` also serves the calibrated algorithms that choose their own integers (gptq.py) or weights (awq.py);
`set_quantized` writes such integers into a quantized model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llm.adapt.base import Transform
from llm.compress.quantized import PARTS, QuantizedEmbedding, QuantizedLinear, QuantizedLMHead, QuantizedWeight
from llm.config import ConfigError, build_config
from llm.errors import UserError
from llm.models.base import Model
from llm.models.layers import LMHead

METHODS = ("int8", "int4", "int8-dynamic")
ALGORITHMS = ("rtn", "gptq", "awq")


@dataclasses.dataclass
class QuantizeSettings:
    """The `quantize` transform's settings (`llm compress quantize` writes them)."""

    method: str = "int8"
    group_size: int = 32  # int4 only: input columns sharing one scale and zero point
    # which algorithm chose the integers (gptq.py, awq.py): a record only. The modules and the file's layout are
    # the same for all; this transform rounds to nearest, and a saved model's tensors replace what it rounded.
    algorithm: str = "rtn"

    def validate(self, path: str) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"{path}.method", f"expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"{path}.algorithm", f"expected one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ConfigError(f"{path}.group_size", f"expected a positive even number, got {self.group_size}")


@dataclasses.dataclass(frozen=True)
class Grid:
    """The integer grid of a weight-only method, computed exactly as torchao computes it, so that an algorithm
    choosing its own integers (GPTQ) or weights (AWQ) gives tensors that load, export and run as RTN's do.

    Symmetric with zero point 0: one scale per row of each group of `group_size` input columns (None: per row),
    scale = max|w| / ((qmax - qmin) / 2), computed in float32, clamped at `eps`, stored in `scale_dtype`;
    q = clamp(round(w * (1 / scale)), qmin, qmax), the reciprocal taken in `scale_dtype`, round half to even
    (torchao choose_qparams_affine + quantize_affine, as IntxWeightOnlyConfig(int4, PerGroup(g),
    scale_dtype=float16) and Int8WeightOnlyConfig() call them). A scale that underflows to 0 gives q = 0 where
    w = 0 (torchao's NaN, cast to int8)."""

    qmin: int
    qmax: int
    group_size: int | None
    scale_dtype: torch.dtype
    eps: float

    @classmethod
    def of(cls, method: str, group_size: int) -> Grid:
        """The grid of `method` ("int4" with `group_size`, or "int8", one scale per row)."""
        if method == "int4":
            return cls(-8, 7, group_size, torch.float16, torch.finfo(torch.float32).smallest_normal)
        if method == "int8":
            return cls(-128, 127, None, torch.float32, torch.finfo(torch.float32).eps)
        raise UserError(f"method: expected int4 or int8 for a calibrated quantization, got {method!r}")

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The scale of each row of w (..., g) over its last dimension: (..., 1) in `scale_dtype`."""
        absmax = w.abs().amax(dim=-1, keepdim=True).float()
        return (absmax / ((self.qmax - self.qmin) / 2)).clamp(min=self.eps).to(self.scale_dtype)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The integers of w on the grid of `scale` (broadcast against w), as values of w's dtype."""
        q = torch.round(w * (1.0 / scale).to(w.dtype))
        return q.clamp(self.qmin, self.qmax).nan_to_num(0.0)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return q * scale.to(q.dtype)

    def rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round to nearest: w (N, K) -> qdata int8 (N, K), scale (N, K / g), zero_point int8 (N, K / g)."""
        n, k = w.shape
        groups = w.reshape(n, -1, self.group_size or k)
        scale = self.scale(groups)
        qdata = self.quantize(groups, scale).reshape(n, k).to(torch.int8)
        return qdata, scale[..., 0], torch.zeros_like(scale[..., 0], dtype=torch.int8)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """w (N, K) rounded to the nearest grid point, as w's dtype: what the quantized layer multiplies by."""
        qdata, scale, _ = self.rtn(w)
        return self.dequantize(qdata.to(w.dtype), scale.repeat_interleave(self.group_size or w.shape[1], dim=1))


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """The model's quantized weights by module name (a tied table under its first name)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def checked_settings(model: Model, settings, path: str = "quantize") -> QuantizeSettings:
    """The settings (a mapping or a `QuantizeSettings`) of the transform for this model; the calibrated
    algorithms check them before calibrating.

    Raises ConfigError naming `path` for a bad setting, an already quantized model, or a group size
    that does not divide a layer's input width."""
    s = build_config(QuantizeSettings, settings, path)
    if quantized_weights(model):
        raise ConfigError(path, "the model is already quantized")
    if s.method == "int4":
        for name, m in _targets(model):
            width = m.weight.shape[1]
            if width % s.group_size:
                raise ConfigError(f"{path}.group_size", f"{s.group_size} does not divide {name}'s width {width}")
    return s


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, LMHead, nn.Embedding))]


def apply(model: Model, settings: QuantizeSettings, path: str = "quantize") -> Model:
    """Quantize the model in place (see the module docstring): each target is replaced by its quantized
    module, with weights rounded to nearest on the method's `Grid`. The model is for inference from here on:
    every parameter stops requiring a gradient (the kernels compute none).

    Raises ConfigError as `checked_settings` does."""
    s = checked_settings(model, settings, path)
    grid = Grid.of("int4" if s.method == "int4" else "int8", s.group_size)
    shared: dict[int, QuantizedWeight] = {}  # id(float weight) -> its quantized weight: a tied table once
    for name, m in _targets(model):
        w = m.weight.detach()
        if id(m.weight) not in shared:
            shared[id(m.weight)] = QuantizedWeight(s.method, *w.shape, s.group_size, w.dtype).to(w.device)
            shared[id(m.weight)].load_parts(*_file_parts(*grid.rtn(w), s.method))
        weight = shared[id(m.weight)]
        if isinstance(m, nn.Embedding):
            layer = QuantizedEmbedding(weight)
        else:
            layer = (QuantizedLMHead if isinstance(m, LMHead) else QuantizedLinear)(weight, m.bias, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model.requires_grad_(False)


def _file_parts(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, method: str) -> tuple:
    """A `Grid`'s (qdata int8 (N, K), scale, zero_point) in the file's layout (int4 packed)."""
    return (pack_int4(qdata) if method == "int4" else qdata), scale, zero_point


# ----------------------------------------------------------------------------
# The file's layout
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


@torch.no_grad()
def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, set[str]]:
    """Load the W.qdata / W.scale / W.zero_point entries of `tensors` into the model's quantized weights.

    Returns (the other tensors, the state-dict names of the quantized weights, tied aliases included).
    Raises UserError naming `where` and the tensor when a part is missing or does not fit."""
    tensors = dict(tensors)
    for name, weight in quantized_weights(model).items():
        keys = [f"{name}.{part}" for part in PARTS]
        for key in keys:
            if key not in tensors:
                raise UserError(f"{where}: {key} missing (the model's config records a quantized {name})")
        try:
            weight.load_parts(*(tensors.pop(key) for key in keys))
        except ValueError as e:
            raise UserError(f"{where}: {name}.{e}") from None
    filled = {
        f"{name}.{part}"
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QuantizedWeight)
        for part in PARTS
    }
    return tensors, filled


@torch.no_grad()
def set_quantized(model: nn.Module, parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Write (qdata int8 (N, K), scale, zero_point) of each module name in `parts` (from a `Grid`) into that
    module's quantized weight, replacing what RTN chose; ValueError when a shape differs (a bug, not input)."""
    for name, values in parts.items():
        weight = model.get_submodule(name).weight
        try:
            weight.load_parts(*_file_parts(*values, weight.method))
        except ValueError as e:
            raise ValueError(f"{name}.weight.{e}") from None


TRANSFORM = Transform("quantize", QuantizeSettings, apply, load_state=load_quantized)
