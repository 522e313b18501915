"""Plain PyTorch versions of every fused op: the "torch" backend and the ground truth.

Shapes and semantics here are the contract that every other backend matches:

* attention: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H % Hkv == 0 (GQA/MQA).
  `causal` aligns the mask to the bottom right (query i sees keys j <= i + Lk - Lq),
  so a cached decode step (Lq=1) sees every key. `key_padding_mask` (B, Lk) is True
  where a key may be attended. `document_ids` (B, T) integer, with Lq = Lk = T, names
  the document of each position of a packed row; a document is a run of equal ids, and
  a query attends only to keys of its own document (causally when `causal`), as
  FlexAttention's document mask and flash-attn's varlen cu_seqlens do. The three masks
  combine. A query that may attend to no key outputs zeros.
* layer_norm / rms_norm normalise over the last dimension; rms_norm computes in
  fp32 and casts back before the weight, as LLaMA does.
* linear_cross_entropy(hidden (N, D), weight (V, D), labels (N,), bias (V,) or None)
  is the mean cross-entropy of hidden @ weight.T + bias over labels != ignore_index (0 when none).
* int8_linear(x (..., K), qweight int8 (N, K), scale fp32 (N,), bias (N,) or None) = x @ W.T + bias with
  W[n, k] = qweight[n, k] * scale[n]: weight-only int8, symmetric, one scale per output channel (torchao's
  Int8WeightOnlyConfig). Output in x's dtype.
* int4_linear(x (..., K), qweight uint8 (N, K/2), scale fp32 (N, K/group_size), group_size, bias) = x @ W.T +
  bias with W[n, k] = (nibble(n, k) - 8) * scale[n, k // group_size]: weight-only int4, symmetric, one scale per
  group of `group_size` input columns (torchao's IntxWeightOnlyConfig(int4, PerGroup(group_size))). Column 2j
  sits in the low nibble of byte j, column 2j+1 in the high nibble, each nibble holding the int4 value + 8
  (`int4_pack`; the same bytes as llm.compress.quantize.pack_int4's two's complement nibbles XOR 0x88).
  The dequantized weight is computed in fp32 (float64 for float64 x) and rounded once to x's dtype.
* int8_dynamic_linear(x, qweight, scale, bias): int8_linear of x quantized per row (token) at run time,
  symmetric, as torchao's Int8DynamicActivationInt8WeightConfig does (`quantize_per_token`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions that carry no loss (PyTorch and Hugging Face agree)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for reductions; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end), each int32 (B, T): position t of row b belongs to the document spanning
    positions [start[b, t], end[b, t]) of that row. A new document starts wherever the id changes."""
    t = document_ids.shape[-1]
    pos = torch.arange(t, device=document_ids.device, dtype=torch.int32).expand_as(document_ids)
    changes = document_ids[:, 1:] != document_ids[:, :-1]
    first = F.pad(changes, (1, 0), value=True)
    last = F.pad(changes, (0, 1), value=True)
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.bool)[:, None, None, :]
    if document_ids is not None:  # (B, 1, T, T): key j is in query i's document; broadcast over heads
        start, end = document_bounds(document_ids)
        keys = torch.arange(lk, device=q.device, dtype=torch.int32)
        same_document = (keys >= start[:, :, None]) & (keys < end[:, :, None])
        mask = same_document[:, None] if mask is None else mask & same_document[:, None]
    is_causal = causal and mask is None and lq == lk
    if causal and not is_causal and lq > 1:  # one query (a decode step) sees every key: no mask to build
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        causal_mask = torch.arange(lk, device=q.device)[None, :] <= rows
        mask = causal_mask if mask is None else mask & causal_mask
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = upcast(x)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    logits = upcast(F.linear(hidden, weight, bias))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 (N, K) * scale (N,) -> (N, K) in `dtype`, computed in fp32 or wider."""
    wide = torch.promote_types(dtype, torch.float32)
    return (qweight.to(wide) * scale.to(wide)[:, None]).to(dtype)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] (any integer dtype, K even) -> uint8 (N, K/2) in int4_linear's layout."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def int4_unpack(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of `int4_pack`: uint8 (N, K/2) -> int8 (N, K) in [-8, 7]."""
    nibbles = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(-2)
    return nibbles.to(torch.int8) - 8


def dequantize_int4(
    qweight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (N, K/2) and scale (N, K/group_size) -> (N, K) in `dtype`, computed in fp32 or wider."""
    wide = torch.promote_types(dtype, torch.float32)
    return (int4_unpack(qweight).to(wide) * scale.to(wide).repeat_interleave(group_size, dim=1)).to(dtype)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize the whole weight, then one matmul: the slow path that every other backend must match."""
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (int8 (..., K), fp32 scale (..., 1)), symmetric per row, in fp32, bit for bit as torchao
    quantizes activations (Int8Tensor.from_hp with PerRow): scale = max|x| / 127.5 (at least fp32's eps),
    q = clamp(round(x * (1 / scale)), -128, 127)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return torch.round(xf * (1.0 / scale)).clamp(-128, 127).to(torch.int8), scale


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    q, x_scale = quantize_per_token(x)
    wide = torch.promote_types(x.dtype, torch.float32)
    return int8_linear((q.to(wide) * x_scale.to(wide)).to(x.dtype), qweight, scale, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_int4(qweight, scale, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
