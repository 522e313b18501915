"""`llm generate`: text from a causal language model at any path the loader reads."""

from __future__ import annotations

from typing import Literal

import torch

from llm.data.tokenizer import Tokenizer
from llm.errors import UserError
from llm.models.generation import decode_layout, generate
from llm.run.loader import find_tokenizer, load_model


def generate_text(
    *,
    model: str,
    prompt: list[str],
    tokenizer: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] | None = None,
) -> list[str]:
    """Generate text from a model with a KV cache (greedy, temperature, top-k, top-p).

    Prints (and returns) each prompt followed by its continuation, from the causal LM at `model` (any
    path the loader reads) and its tokenizer.json. An instruction-tuned model gets each prompt inside
    the template saved with it (the template's special tokens are control tokens, the prompt is
    text); a plain causal LM's prompt is read as transformers reads it, special tokens included.

    Args:
        model: llm model directory, Hugging Face directory or checkpoint
        prompt: prompt text (repeat the flag for a batch)
        tokenizer: tokenizer.json (default: the one beside the model)
        max_new_tokens: tokens generated after each prompt, at most
        temperature: softmax temperature; 0 means greedy
        top_k: sample among the k most likely tokens (default: all)
        top_p: sample among the most likely tokens whose probabilities sum to p (default: all)
        seed: seed of the sampling
        dtype: cast the model's weights (rotary tables stay float32; default: as loaded)

    Example:
        llm generate --model runs/quickstart/export --prompt "def main(" --max-new-tokens 64 --top-k 40
    """
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k <= 0:
        raise UserError(f"--top-k: must be > 0, got {top_k}")
    lm = decode_layout(load_model(model, dtype=dtype))
    if lm.task not in ("causal_lm", "instruction"):
        raise UserError(f"{model}: a {lm.task!r} model; generation needs a causal_lm or instruction model")
    tok_path = tokenizer or find_tokenizer(model)
    if tok_path is None:
        raise UserError(f"{model}: no tokenizer.json beside the model or its run directory; pass --tokenizer")
    tok = Tokenizer(tok_path)

    if lm.task == "instruction":  # each prompt in the template it was tuned with
        encoded = [lm.options.encode(tok, p) for p in prompt]
    else:
        encoded = tok.encode_batch(list(prompt), ordinary=False)
    vocab = lm.config.vocab_size
    for text, ids in zip(prompt, encoded):
        if not ids:
            raise UserError(f"prompt {text!r} encodes to no tokens")
        if max(ids) >= vocab:
            raise UserError(f"{tok.path}: prompt {text!r} has token id {max(ids)} beyond the model's vocab {vocab}")
    eos = lm.config.eos_ids or ([tok.eos_id] if tok.eos_id is not None else [])
    pad = tok.pad_id if tok.pad_id is not None else (eos[0] if eos else 0)
    width = max(len(ids) for ids in encoded)
    # left padding: every prompt ends at the same column, so new tokens share positions in the batch
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    generator = torch.Generator().manual_seed(seed)
    try:
        out = generate(
            lm,
            input_ids,
            max_new_tokens=max_new_tokens,
            attention_mask=mask,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos or None,
            generator=generator,
        )
    except ValueError as e:
        raise UserError(f"{model}: {e}") from None
    texts = []
    for row, ids in zip(out, encoded):
        new = row[width:].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        new = new[: ends[0]] if ends else new
        texts.append(tok.decode(ids + new))
        print(texts[-1])
    return texts
