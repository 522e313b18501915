"""flash-attn (Dao-AILab) as the "flash_attn" attention backend, where it is installed.

flash-attn takes (batch, seq, heads, head_dim), handles GQA/MQA itself and aligns
the causal mask to the bottom right (since 2.1), as reference.attention does.
"""

from __future__ import annotations

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale, causal=causal
    )
    return out.transpose(1, 2)


def attention_unsupported(
    q: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None, **call
) -> str | None:
    if key_padding_mask is not None:
        return "flash_attn_func takes no key padding mask (that needs the varlen interface)"
    if q is not None and q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs fp16/bf16 only, not {q.dtype}"
    if q is not None and q.shape[-1] > 256:
        return f"flash-attn supports head dims up to 256, not {q.shape[-1]}"
    return None
