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

__all__ = [
    "BACKENDS",
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
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head; q (B, H, Lq, D), k/v (B, Hkv, Lk, D).

    `document_ids` (B, T) integer, T = Lq = Lk: the document of each position of a packed
    row (a run of equal ids is one document); queries attend only within their document.
    Raises ValueError when its shape or dtype does not fit q and k.
    """
    if document_ids is not None:
        _check_document_ids(q, k, document_ids)
    call = dict(causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, document_ids=document_ids)
    _, fn = resolve("attention", backend, q.device.type, q=q, k=k, v=v, **call)
    return fn(q, k, v, scale=scale, **call)


def _check_document_ids(q: torch.Tensor, k: torch.Tensor, document_ids: torch.Tensor) -> None:
    b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    if lq != lk:
        raise ValueError(f"document_ids need as many queries as keys (packed rows), got {lq} queries and {lk} keys")
    if document_ids.shape != (b, lk) or document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        raise ValueError(
            f"document_ids must be an integer (batch, seq) = {(b, lk)} tensor, "
            f"got {document_ids.dtype} {tuple(document_ids.shape)}"
        )
    if document_ids.device != q.device:
        raise ValueError(f"document_ids are on {document_ids.device}, q on {q.device}")


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
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, without keeping
    fp32 logits where the backend can avoid it. hidden (N, D), weight (V, D), labels (N,)."""
    _, fn = resolve(
        "linear_cross_entropy", backend, hidden.device.type, hidden=hidden, weight=weight, labels=labels, bias=bias
    )
    return fn(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
