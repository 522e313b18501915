"""GPTQ: quantize a Linear column by column, each column's rounding error fed back into the columns not yet
quantized through the inverse Hessian of the layer's squared output error (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

As in the reference implementation (IST-DASLab/gptq, gptq.py `fasterquant`): H = 2 X X^T over the
calibration tokens; inputs that never fire (H_jj = 0) get H_jj = 1 and their weights 0; the dampening
lambda = damp * mean(diag H) is added to the diagonal; the updates use the upper Cholesky factor U of
H^-1 (row j of U is the j-th elimination step's [H_F^-1]_{j,:} / sqrt([H_F^-1]_jj)) and are applied lazily,
128 columns at a time. The grid is today's format (llm.compress.quantize.Grid), its scales found group by
group from the weights as updated when the group's first column comes up. One deliberate difference from
the reference: a group's scale reads the block's up-to-date columns (the reference reads the matrix as of
the block's start), and the blocks hold whole groups, so the lazy form equals the plain Algorithm 1.

`quantize_model` runs it on every Linear of the blocks with layer-by-layer calibration (calibrate.py): the
Hessians of a block's Linears come from one forward pass of the block as it was (opt.py's default; the
next block sees this block quantized), and the integers and scales are written into the model quantized by
the `quantize` transform.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llm import adapt
from llm.compress import calibrate, quantize
from llm.errors import UserError
from llm.log import logger
from llm.models.base import Model


def inverse_hessian_factor(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight with the columns of dead inputs zeroed, upper Cholesky factor U of (H + lambda I)^-1), both in
    the weight's dtype. When the dampened H is not numerically positive definite, lambda grows tenfold (from
    1% of mean(diag H) when `damp` is 0) until it is, and a warning names the layer and the dampening used.
    Raises UserError naming the layer when H is not finite."""
    H = hessian.to(weight.dtype, copy=True)
    if not torch.isfinite(H).all():
        raise UserError(f"{name}: its calibration inputs are not finite (NaN or inf in the Hessian)")
    dead = H.diagonal() == 0
    if dead.any():
        logger.warning(
            f"{name}: {int(dead.sum())} of its {len(H)} inputs are 0 on every calibration token (a singular "
            "Hessian); their weights are set to 0, as the reference implementation does"
        )
    H[dead, dead] = 1
    weight = weight.clone()
    weight[:, dead] = 0
    mean_diag = H.diagonal().mean()
    fraction = damp
    while fraction <= 100:
        damped = H.clone()
        damped.diagonal().add_(fraction * mean_diag)  # H + lambda I, without a K x K identity
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                if fraction != damp:
                    logger.warning(
                        f"{name}: the Hessian of its inputs is singular with dampening {damp:g} of its mean "
                        f"diagonal; dampened with {fraction:g} instead"
                    )
                return weight, U
        fraction = fraction * 10 if fraction else 0.01
    raise UserError(f"{name}: the Hessian of its inputs stays singular with dampening {fraction / 10:g}")


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: quantize.Grid,
    damp: float = 0.01,
    name: str = "weight",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize weight (N, K) against the Hessian (K, K) of its inputs on `grid`; see the module docstring.

    Returns (qdata int8 (N, K), scale (N, K / g) in the grid's scale dtype, zero_point int8 zeros), as
    `Grid.rtn` does. Computes in float32 (float64 for a float64 weight)."""
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    W, U = inverse_hessian_factor(W, hessian, damp, name)
    n, k = W.shape
    g = grid.group_size or k
    if grid.group_size:
        block_size = g * max(1, block_size // g)  # blocks of whole groups
    else:
        scale = grid.scale(W)  # one per row, from the whole row before any update
    Q = torch.empty(n, k, dtype=torch.int8, device=W.device)
    scales = []
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.empty_like(W1)
        for i in range(i2 - i1):
            if grid.group_size and (i1 + i) % g == 0:
                scale = grid.scale(W1[:, i : i + g])
                scales.append(scale)
            w = W1[:, i : i + 1]
            q = grid.quantize(w, scale)
            Q[:, i1 + i] = q[:, 0].to(torch.int8)
            err[:, i : i + 1] = (w - grid.dequantize(q, scale)) / U1[i, i]
            W1[:, i:] -= err[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    scale = torch.cat(scales, dim=1) if grid.group_size else scale
    return Q, scale, torch.zeros_like(scale, dtype=torch.int8)


def quantize_model(
    model: Model,
    batches,
    method: str = "int4",
    group_size: int = 128,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> Model:
    """GPTQ on every Linear of the blocks, calibrated on `batches` (this rank's model inputs), then the model
    quantized in place by the `quantize` transform ({method, group_size, algorithm: gptq}, recorded) with GPTQ's
    integers and scales in the blocks' layers (the embeddings and the head are rounded to nearest, as the
    reference leaves them). Raises what `calibrate` and the transform raise."""
    settings = {"method": method, "group_size": group_size, "algorithm": "gptq"}
    quantize.checked_settings(model, settings)
    grid = quantize.Grid.of(method, group_size)
    parts = {}

    def compress_block(prefix: str, block: nn.Module, data: calibrate.Calibration) -> None:
        stats = data.linear_stats(block)
        linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        jobs = [
            lambda name=name, m=m: gptq(m.weight, stats[name].hessian(), grid, damp, f"{prefix}.{name}")
            for name, m in linears
        ]
        templates = [grid.rtn(m.weight.detach()) for _, m in linears]  # tensors shaped and typed as the results
        for (name, m), (qdata, scale, zero_point) in zip(linears, data.shared(jobs, templates)):
            g = grid.group_size or m.in_features
            m.weight.copy_(grid.dequantize(qdata.to(m.weight.dtype), scale.repeat_interleave(g, dim=1)))
            parts[f"{prefix}.{name}"] = (qdata.cpu(), scale.cpu(), zero_point.cpu())

    calibrate.calibrate(model, batches, compress_block, device, group)
    adapt.apply_transform(model, {"name": "quantize", **settings}, "quantize", {"quantize": quantize.TRANSFORM})
    quantize.set_quantized(model, parts)
    return model
