"""flash-attn (Dao-AILab) as the "flash_attn" attention backend, where it is installed.

flash-attn takes (batch, seq, heads, head_dim), handles GQA/MQA itself and aligns
the causal mask to the bottom right (since 2.1), as reference.attention does.
Packed rows (`document_ids`) go through `flash_attn_varlen_func`: every document
becomes one sequence of a flattened batch described by cumulative lengths
(cu_seqlens), with padded positions left out, as Hugging Face's flash-attention
path unpads its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.kernels.reference import document_bounds


def varlen_layout(
    document_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(indices, cu_seqlens, max_seqlen) of the documents of a packed (B, T) batch for flash_attn_varlen_func.

    indices (N,) int64: the kept (unpadded) positions of the flattened B * T batch, in order, so documents
    are contiguous; cu_seqlens (S + 1,) int32: 0 and the running sum of the S documents' kept lengths;
    max_seqlen: the longest (a Python int: flash-attn sizes its grid with it, so this synchronises).
    """
    start, _ = document_bounds(document_ids)
    first = start == torch.arange(start.shape[1], device=start.device)
    keep = torch.ones_like(first) if key_padding_mask is None else key_padding_mask.to(torch.bool).expand_as(first)
    indices = keep.flatten().nonzero().squeeze(1)
    document = first.flatten().cumsum(0)[indices]  # nondecreasing document number of each kept position
    lengths = torch.unique_consecutive(document, return_counts=True)[1]
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max()) if len(lengths) else 0


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
    """As reference.attention, except that with `document_ids` padded query positions output zeros."""
    if document_ids is None:
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=causal,
        )
        return out.transpose(1, 2)

    from flash_attn import flash_attn_varlen_func

    b, h, t, d = q.shape
    indices, cu_seqlens, max_seqlen = varlen_layout(document_ids, key_padding_mask)
    out = q.new_zeros(b * t, h, d)
    if len(indices):
        unpadded = (x.transpose(1, 2).reshape(b * t, x.shape[1], d)[indices] for x in (q, k, v))
        packed = flash_attn_varlen_func(
            *unpadded,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p=dropout_p,
            softmax_scale=scale,
            causal=causal,
        )
        out = out.index_copy(0, indices, packed)
    return out.view(b, t, h, d).transpose(1, 2)


def attention_unsupported(
    q: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    **call,
) -> str | None:
    if key_padding_mask is not None and document_ids is None:
        return "flash_attn_func takes no key padding mask (only packed rows with document_ids go through varlen)"
    if q is not None and q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs fp16/bf16 only, not {q.dtype}"
    if q is not None and q.shape[-1] > 256:
        return f"flash-attn supports head dims up to 256, not {q.shape[-1]}"
    return None
