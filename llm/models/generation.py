"""Autoregressive generation with a preallocated KV cache.

Greedy (temperature 0), temperature sampling, top-k and top-p (nucleus)
filtering, and stopping at EOS. Left-padded batches work: positions come from
the attention mask, and padding is masked out of attention. With the cache the
chosen tokens equal those of recomputing the whole sequence at every step, also
with a prefix or soft prompt in the trunk (the cache holds their keys too).
"""

from __future__ import annotations

import torch
from torch import nn

from llm.models.transformer import KVCache


def decode_layout(model: nn.Module) -> nn.Module:
    """Store the weight (out, in) of every wide nn.Linear (out > in: qkv, the MLP's input) column-major,
    in place, and return `model`: the same shapes and values, laid out as their transposes (in, out),
    as GPT-2's Conv1D stores them.

    A decode step multiplies one token's vector by every weight, and single-thread MKL streams a wide
    weight 1.5-1.8x faster in this layout (a narrow one is faster row-major, as nn.Linear keeps it):
    docs/compression.md, "Figures: inference speed". For inference only: DeepSpeed needs contiguous
    parameters, and safetensors contiguous tensors (`llm.transforms.plain_state` makes them so)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set whose
    probability reaches top_p (the most likely token always stays)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend `input_ids` (B, T) by up to `max_new_tokens`; returns (B, T + n).

    Sequences that produced an EOS (`eos_token_id`, default the config's; an int or a list,
    any of which ends a sequence) are padded with that id's first value until all have finished.
    """
    cfg = model.config
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    trunk = model.transformer
    soft = trunk.virtual_positions  # a soft prompt's positions come first
    if cfg.position in ("learned", "sinusoidal") and total + soft > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens})"
            + (f" + soft prompt ({soft})" if soft else "")
            + f" exceeds max_seq_len={cfg.max_seq_len}"
        )
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    if eos is not None and not eos.numel():
        eos = None
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    cache = KVCache(cfg, batch, total + trunk.num_virtual_tokens, param.dtype, param.device) if use_cache else None
    ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    try:
        for step in range(max_new_tokens):
            fresh = ids if cache is None or step == 0 else ids[:, -1:]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -fresh.shape[1] :]
            logits = model(fresh, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1].float()
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                token = torch.where(finished, torch.full_like(token, int(eos[0])), token)
                finished |= torch.isin(token, eos)
            ids = torch.cat((ids, token[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            if eos is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return ids
