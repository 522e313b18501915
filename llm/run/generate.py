"""`llm generate`: text from a causal language model at any path the loader reads."""

from __future__ import annotations

import torch

from llm.data.tokenizer import Tokenizer
from llm.errors import UserError
from llm.models.generation import generate
from llm.run.loader import find_tokenizer, load_model


def generate_text(
    model_path: str,
    prompts: list[str],
    tokenizer: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[str]:
    """Each prompt followed by its continuation, from the causal LM at `model_path` (any
    format `load_model` reads) and its tokenizer.json (default: the one beside the model).
    An instruction-tuned model gets each prompt inside the template saved with it."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k <= 0:
        raise UserError(f"--top-k: must be > 0, got {top_k}")
    model = load_model(model_path)
    if model.task not in ("causal_lm", "instruction"):
        raise UserError(f"{model_path}: a {model.task!r} model; generation needs a causal_lm or instruction model")
    if model.task == "instruction":  # the template the model was tuned with wraps each prompt
        prompts = [model.options.format(p) for p in prompts]
    tok_path = tokenizer or find_tokenizer(model_path)
    if tok_path is None:
        raise UserError(f"{model_path}: no tokenizer.json beside the model or its run directory; pass --tokenizer")
    tok = Tokenizer(tok_path)

    encoded = tok.encode_batch(list(prompts))
    vocab = model.config.vocab_size
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise UserError(f"prompt {prompt!r} encodes to no tokens")
        if max(ids) >= vocab:
            raise UserError(f"{tok.path}: prompt {prompt!r} has token id {max(ids)} beyond the model's vocab {vocab}")
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_id
    pad = tok.pad_id if tok.pad_id is not None else (eos if eos is not None else 0)
    width = max(len(ids) for ids in encoded)
    # left padding: every prompt ends at the same column, so new tokens share positions in the batch
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    generator = torch.Generator().manual_seed(seed)
    try:
        out = generate(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            attention_mask=mask,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos,
            generator=generator,
        )
    except ValueError as e:
        raise UserError(f"{model_path}: {e}") from None
    texts = []
    for row, ids in zip(out, encoded):
        new = row[width:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        texts.append(tok.decode(ids + new))
    return texts
