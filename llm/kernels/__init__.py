"""Fused ops behind one call each; `backend` picks the implementation (see dispatch.py).

Models call only these functions, so a faster kernel reaches every model without
changes. The semantics (shapes, masks, dtypes) are documented in reference.py.
"""

from __future__ import annotations

import torch

from llm.kernels.dispatch import (
    BACKENDS,
    OPS,
    BackendUnavailable,
    auto_order_from_results,
    available_backends,
    check_names,
    resolve,
    set_auto_order,
    set_backend,
    use,
)
from llm.kernels.reference import IGNORE_INDEX

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "OPS",
    "BackendUnavailable",
    "attention",
    "auto_order_from_results",
    "available_backends",
    "check_names",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "set_auto_order",
    "set_backend",
    "use",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head; q (B, H, Lq, D), k/v (B, Hkv, Lk, D)."""
    _, fn = resolve(
        "attention",
        backend,
        q.device.type,
        q=q,
        k=k,
        v=v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
    )
    return fn(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    _, fn = resolve("layer_norm", backend, x.device.type, x=x, weight=weight, bias=bias)
    return fn(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    _, fn = resolve("rms_norm", backend, x.device.type, x=x, weight=weight)
    return fn(x, weight, eps)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, without keeping
    fp32 logits where the backend can avoid it. hidden (N, D), weight (V, D), labels (N,)."""
    _, fn = resolve(
        "linear_cross_entropy", backend, hidden.device.type, hidden=hidden, weight=weight, labels=labels, bias=bias
    )
    return fn(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
