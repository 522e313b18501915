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
from llm.kernels.reference import (
    IGNORE_INDEX,
    dequantize_int4,
    dequantize_int8,
    int4_pack,
    int4_unpack,
    quantize_per_token,
)

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "OPS",
    "BackendUnavailable",
    "attention",
    "auto_order_from_results",
    "available_backends",
    "check_names",
    "dequantize_int4",
    "dequantize_int8",
    "int4_linear",
    "int4_pack",
    "int4_unpack",
    "int8_dynamic_linear",
    "int8_linear",
    "layer_norm",
    "linear_cross_entropy",
    "quantize_per_token",
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
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, without keeping
    fp32 logits where the backend can avoid it. hidden (N, D), weight (V, D), labels (N,)."""
    _, fn = resolve(
        "linear_cross_entropy", backend, hidden.device.type, hidden=hidden, weight=weight, labels=labels, bias=bias
    )
    return fn(hidden, weight, labels, bias=bias, ignore_index=ignore_index)


def _check_quantized(x, qweight, scale, bias, dtype, scale_shape: tuple[int, ...], k: int) -> None:
    """ValueError naming what a quantized linear call got and what its layout needs (reference.py)."""
    n = qweight.shape[0]
    if (
        qweight.dtype == dtype
        and qweight.dim() == 2
        and x.shape[-1] == k
        and scale.dtype == torch.float32
        and scale.shape == scale_shape
        and (bias is None or bias.shape == (n,))
    ):
        return
    got_bias = None if bias is None else tuple(bias.shape)
    raise ValueError(
        f"quantized linear: got x {tuple(x.shape)}, qweight {qweight.dtype} {tuple(qweight.shape)}, scale "
        f"{scale.dtype} {tuple(scale.shape)}, bias {got_bias}; expected x (..., {k}), qweight {dtype} "
        f"({n}, {qweight.shape[-1]}), scale torch.float32 {scale_shape}, bias ({n},) or None"
    )


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K) @ (qweight (N, K) int8 * scale (N,) fp32 per output channel).T + bias, in x's dtype.

    Weight-only int8 as torchao's Int8WeightOnlyConfig stores it (symmetric, zero point 0). On a CPU the
    "cpu" backend never materialises the fp32 weight. Raises ValueError for tensors that do not fit."""
    _check_quantized(x, qweight, scale, bias, torch.int8, (qweight.shape[0],), qweight.shape[-1])
    _, fn = resolve("int8_linear", backend, x.device.type, x=x, bias=bias)
    return fn(x, qweight, scale, bias)


def int8_dynamic_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`int8_linear` of x quantized per token at run time (`quantize_per_token`), as torchao's
    Int8DynamicActivationInt8WeightConfig computes it; for encoders and classifiers on a CPU, where the
    "cpu" backend runs an int8 GEMM. Raises ValueError for tensors that do not fit."""
    _check_quantized(x, qweight, scale, bias, torch.int8, (qweight.shape[0],), qweight.shape[-1])
    _, fn = resolve("int8_dynamic_linear", backend, x.device.type, x=x, bias=bias)
    return fn(x, qweight, scale, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K) @ W.T + bias with W the int4 weight qweight uint8 (N, K/2) (two columns per byte, see
    `int4_pack`) times scale (N, K/group_size) fp32, one per group of input columns; in x's dtype.

    The layout of torchao's IntxWeightOnlyConfig(int4, PerGroup(group_size)) after `int4_pack`. Raises
    ValueError for tensors that do not fit, or a group size that does not divide K."""
    k = 2 * qweight.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"quantized linear: group_size {group_size} does not divide the input width {k}")
    _check_quantized(x, qweight, scale, bias, torch.uint8, (qweight.shape[0], k // group_size), k)
    _, fn = resolve("int4_linear", backend, x.device.type, x=x, group_size=group_size, bias=bias)
    return fn(x, qweight, scale, group_size, bias)
