"""NVIDIA apex's fused LayerNorm / RMSNorm as the "apex" backend, where it is installed.

apex scales by the weight before casting back, so its RMSNorm can differ from
reference.rms_norm (cast, then scale) by one rounding of the output dtype.
"""

from __future__ import annotations

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_layer_norm, fused_layer_norm_affine

    shape = x.shape[-1:]
    if weight is None and bias is None:
        return fused_layer_norm(x, shape, eps)
    if weight is None:
        weight = torch.ones(shape, dtype=bias.dtype, device=bias.device)
    if bias is None:
        bias = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    return fused_layer_norm_affine(x, weight, bias, shape, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm, fused_rms_norm_affine

    if weight is None:
        return fused_rms_norm(x, x.shape[-1:], eps)
    return fused_rms_norm_affine(x, weight, x.shape[-1:], eps)
