"""SparseGPT: prune a Linear column by column, each removed weight's error compensated in the columns not yet
visited by the Optimal Brain Surgeon update through the inverse Hessian of the layer's squared output error
(Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

As in the reference implementation (IST-DASLab/sparsegpt, sparsegpt.py `fasterprune`), with GPTQ's Hessian
preparation (dead inputs, dampening, Cholesky factor U of H^-1: llm.compress.gptq) and lazy updates 128
columns at a time. The mask is chosen adaptively from the weights as updated so far, by the OBS saliency
w^2 / [U_jj]^2: unstructured, the fraction `sparsity` of each block of 128 columns with the lowest saliency
(exactly floor(sparsity * rows * columns) of them; the reference's `<=` threshold may take one more);
n:m, the n lowest of every m consecutive weights of a row, chosen when the sweep reaches those m columns.

`prune_model` runs it on every Linear of the blocks with layer-by-layer calibration (calibrate.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llm.compress import calibrate, prune
from llm.compress.gptq import inverse_hessian_factor
from llm.errors import UserError


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    pattern: tuple[int, int] | None = None,
    damp: float = 0.01,
    name: str = "weight",
    block_size: int = 128,
) -> torch.Tensor:
    """Prune weight (N, K) against the Hessian (K, K) of its inputs: a fraction `sparsity`, or n of every m
    consecutive weights of a row for `pattern` (n, m). Returns the pruned, updated weight in the weight's dtype
    (computed in float32, float64 for a float64 weight)."""
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    W, U = inverse_hessian_factor(W, hessian, damp, name)
    n, k = W.shape
    if pattern:
        block_size = pattern[1] * max(1, block_size // pattern[1])  # blocks of whole n:m groups
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err, d2 = torch.empty_like(W1), U1.diagonal() ** 2
        if pattern:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = (W1**2 / d2).flatten()
            pruned = torch.zeros_like(scores, dtype=torch.bool)
            pruned[scores.topk(int(sparsity * scores.numel()), largest=False).indices] = True
            pruned = pruned.view_as(W1)
        for i in range(i2 - i1):
            if pattern and i % pattern[1] == 0:
                cols = slice(i, i + pattern[1])
                pruned[:, cols] = ~prune.nm_mask(W1[:, cols] ** 2 / d2[cols], *pattern)
            w = W1[:, i : i + 1].clone()
            q = w.masked_fill(pruned[:, i : i + 1], 0)
            err[:, i : i + 1] = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, i : i + 1] * U1[i : i + 1, i:]
            W1[:, i : i + 1] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W.to(weight.dtype)


def prune_model(
    model: nn.Module,
    batches,
    sparsity: float = 0.5,
    pattern: str | None = None,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """SparseGPT on every Linear of the blocks, calibrated on `batches` (this rank's model inputs), in place:
    a fraction `sparsity` in (0, 1), or the n:m `pattern` ("2:4": 2 of every 4 consecutive weights of a row,
    sparsity n / m). Returns each layer's sparsity. Raises UserError for a sparsity outside (0, 1), a bad
    pattern or a width the pattern does not divide (naming the layer), and what `calibrate` raises."""
    nm = prune.parse_pattern(pattern) if pattern else None
    if nm:
        prune.check_pattern(prune.prunable_linears(model), nm, pattern)
    elif not 0 < sparsity < 1:
        raise UserError(f"--sparsity: expected 0 < s < 1, got {sparsity}")
    result = {}

    def compress_block(prefix: str, block: nn.Module, data: calibrate.Calibration) -> None:
        stats = data.linear_stats(block)
        linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        jobs = [
            lambda name=name, m=m: (sparsegpt(m.weight, stats[name].hessian(), sparsity, nm, damp, f"{prefix}.{name}"),)
            for name, m in linears
        ]
        for (name, m), (weight,) in zip(linears, data.shared(jobs, [(m.weight.detach(),) for _, m in linears])):
            m.weight.copy_(weight)
            result[f"{prefix}.{name}"] = float((weight == 0).float().mean())

    calibrate.calibrate(model, batches, compress_block, device, group)
    return result
