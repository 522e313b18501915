"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration"; reference implementation mit-han-lab/llm-awq, awq/quantize/
auto_scale.py and auto_clip.py).

Input channels that see large activations matter most. Per block, for each Linear whose input comes from an
op that can absorb a per-channel factor, the input channels are scaled by s = mean|x|^alpha (normalised by
sqrt(max(s) min(s)), as the reference does): the Linear's columns are multiplied by s and the preceding op's
output divided by s, so the float model computes the same function. alpha is searched on the grid
0, 0.05, ..., 0.95 (the reference's 20 points) for the smallest mean squared error of the block's output over
the calibration tokens with that Linear rounded to the grid, the block's other layers in float (the reference
measures the output of the module the Linear belongs to; the block's output also counts what follows it).
The pairs (llm.models.layers names):
- attn_norm -> attn.qkv and mlp_norm -> mlp.fc_in, in pre-norm blocks (in post-norm blocks the norm's
  output is also the residual stream, so nothing can absorb the factor);
- the v rows of attn.qkv -> attn.proj, when every query head has its own value head (MHA; under GQA a value
  channel feeds several heads, and the reference skips this pair too);
- the up half of mlp.fc_in -> mlp.fc_out for SwiGLU (silu(gate) * up is linear in up; a GELU is not, so
  GELU MLPs' fc_out is not scaled).
Then the weights are clipped: for every row and group, the clipping range max|w| * (1 - i/20), i < 10, that
minimises the squared output error of the rounded group over the calibration tokens, as the reference does
(the q and k rows of qkv are not clipped: their error passes through q k^T). The reference measures that
error on 512 sampled tokens; here it is exact over all tokens through the inputs' second moments X X^T.

`quantize_model` applies both to every block with layer-by-layer calibration (calibrate.py; the next block's
inputs are this block's outputs scaled and clipped, in float, as the reference feeds the float block's), then
quantizes the model with the `quantize` transform: the grid and the stored format are RTN's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from llm import adapt
from llm.compress import calibrate, quantize
from llm.models.base import Model

ALPHAS = [i / 20 for i in range(20)]
SHRINKS = [1 - i / 20 for i in range(10)]


@dataclasses.dataclass
class ScaledPair:
    """A Linear and the rows (dim 0) of the tensors that produce its input channels (weights and biases of
    the preceding op; the Linear's input channel c comes from row c of each)."""

    linear: str
    producers: list[tuple[torch.Tensor, slice]]


def scaled_pairs(block: nn.Module) -> list[ScaledPair]:
    """The pairs of the module docstring that this block's architecture allows, in the block's order."""
    attn, mlp = block.attn, block.mlp
    v, up = slice(sum(attn.split[:2]), None), slice(mlp.fc_out.in_features, None)
    candidates = [
        ("attn.qkv", block.pre_norm, block.attn_norm, slice(None)),
        ("attn.proj", attn.kv_heads == attn.n_heads, attn.qkv, v),
        ("mlp.fc_in", block.pre_norm, block.mlp_norm, slice(None)),
        ("mlp.fc_out", mlp.kind == "swiglu", mlp.fc_in, up),
    ]
    return [
        ScaledPair(linear, [(t, rows) for t in (producer.weight, producer.bias) if t is not None])
        for linear, allowed, producer, rows in candidates
        if allowed
    ]


@torch.no_grad()
def scale_block(block: nn.Module, data: calibrate.Calibration, grid: quantize.Grid) -> None:
    """Search and fold the activation scales of every pair of the block (see the module docstring); the
    block's float function is unchanged."""
    stats = data.linear_stats(block)
    targets = data.forward(block)
    for pair in scaled_pairs(block):
        linear = block.get_submodule(pair.linear)
        w = linear.weight.detach().clone()
        best_error, best = float("inf"), None
        for alpha in ALPHAS:
            s = stats[pair.linear].mean_abs().pow(alpha).clamp(min=1e-4)
            s = (s / (s.max() * s.min()).sqrt()).to(w.dtype)
            linear.weight.copy_(grid.fake_quantize(w * s) / s)
            error = data.squared_error(block, targets)
            if error < best_error:
                best_error, best = error, s
        linear.weight.copy_(w)
        fold(block, pair, best)


@torch.no_grad()
def fold(block: nn.Module, pair: ScaledPair, s: torch.Tensor) -> None:
    """Multiply the pair's Linear's input columns by s (K,) and divide its producers' rows by s."""
    block.get_submodule(pair.linear).weight.mul_(s)
    for t, rows in pair.producers:
        t[rows] /= s.view(-1, *[1] * (t.dim() - 1))


@torch.no_grad()
def clip_block(block: nn.Module, data: calibrate.Calibration, grid: quantize.Grid) -> None:
    """Clip every Linear's weights (v rows only of qkv) to the ranges that minimise each group's rounded output
    error over the calibration inputs (see the module docstring)."""
    stats = data.linear_stats(block)
    for name, linear in block.named_modules():
        if not isinstance(linear, nn.Linear):
            continue
        rows = slice(sum(block.attn.split[:2]), None) if linear is block.attn.qkv else slice(None)
        w = linear.weight[rows]
        w.copy_(clipped(w, stats[name].xtx, grid))


def clipped(w: torch.Tensor, xtx: torch.Tensor, grid: quantize.Grid) -> torch.Tensor:
    """w (N, K) clipped per row and group to max|w| * shrink, the shrink in SHRINKS with the least
    sum over tokens of ((w_g - q(w_g)) . x_g)^2 = d^T (X X^T)_gg d, d = w_g - q(w_g)."""
    n, k = w.shape
    g = grid.group_size or k
    groups = k // g
    second = torch.stack([xtx[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(groups)])  # (G, g, g)
    w3 = w.reshape(n, groups, g)
    absmax = w3.abs().amax(dim=2, keepdim=True)
    best_error = torch.full((n, groups), float("inf"), dtype=torch.float64, device=w.device)
    best = absmax.clone()
    for shrink in SHRINKS:
        limit = absmax * shrink
        d = (grid.fake_quantize(w3.clamp(-limit, limit).reshape(n, k)).reshape(n, groups, g) - w3).double()
        error = torch.einsum("ngi,gij,ngj->ng", d, second, d)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[..., None], limit, best)
    return w3.clamp(-best, best).reshape(n, k)


def quantize_model(
    model: Model,
    batches,
    method: str = "int4",
    group_size: int = 128,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> Model:
    """AWQ scales and clipping on every block, calibrated on `batches` (this rank's model inputs), then the
    model quantized in place by the `quantize` transform ({method, group_size, algorithm: awq}, recorded). Raises what
    `calibrate` and the transform raise."""
    settings = {"method": method, "group_size": group_size, "algorithm": "awq"}
    quantize.checked_settings(model, settings)
    grid = quantize.Grid.of(method, group_size)

    def compress_block(prefix: str, block: nn.Module, data: calibrate.Calibration) -> None:
        scale_block(block, data, grid)
        clip_block(block, data, grid)

    calibrate.calibrate(model, batches, compress_block, device, group)
    return adapt.apply_transform(model, {"name": "quantize", **settings}, "quantize", {"quantize": quantize.TRANSFORM})
