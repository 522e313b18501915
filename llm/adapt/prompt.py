"""Prompt tuning: learned input embeddings in front of every sequence (Lester et al., 2021,
arXiv:2104.08691). The model itself is frozen.

`num_virtual_tokens` soft-prompt vectors are put before the input's word
embeddings; they take positions 0..n-1 (and token type 0) and the input's
positions shift by n, as in Hugging Face PEFT. The trunk returns the input
tokens' hidden states only, so labels, attention masks and classification
pooling ([CLS], mean or last token) see the input as without a prompt, and
generation with a KV cache keeps the prompt in the cache.

Settings (`PromptSettings`; recipe `adapt: {method: prompt, ...}` or `transforms: [{name: prompt, ...}]`):
- `num_virtual_tokens` (required): n; n + the input length must fit max_seq_len;
- `init_ids`: token ids whose embeddings start the prompt (repeated to length n);
- `init_text` + `tokenizer` (a tokenizer.json): the same from a text, tokenized
  once at apply time; the ids are then recorded in `init_ids`, so reloading needs
  no tokenizer;
- without either, the prompt starts from the embeddings of n random vocabulary
  tokens (the paper's "sampled vocabulary" initialisation);
- `trainable` ([]): modules that train in full beside the prompt (a new
  classification head: `[classifier]`, as PEFT's modules_to_save).

The prompt lives in `model.transformer.prompt` (a `SoftPrompt`); its state-dict
name is `transformer.prompt.embedding.weight`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llm.adapt.base import Transform
from llm.adapt.freeze import freeze_base, trainable_params
from llm.config import ConfigError
from llm.models.base import Model


@dataclasses.dataclass
class PromptSettings:
    num_virtual_tokens: int = 0
    init_ids: list[int] | None = None
    init_text: str | None = None
    tokenizer: str | None = None
    trainable: list[str] = dataclasses.field(default_factory=list)

    def validate(self, path: str) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{path}.num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        if self.init_text is not None and self.init_ids is None and self.tokenizer is None:
            raise ConfigError(f"{path}.tokenizer", "init_text needs the tokenizer.json that encodes it")
        if self.init_ids is not None and not self.init_ids:
            raise ConfigError(f"{path}.init_ids", "is empty")


class SoftPrompt(nn.Module):
    """n learned embeddings; forward(batch) gives them as (batch, n, d_model)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.num_virtual_tokens = n
        self.embedding = nn.Embedding(n, d)

    def forward(self, batch: int) -> torch.Tensor:
        ids = torch.arange(self.num_virtual_tokens, device=self.embedding.weight.device)
        return self.embedding(ids)[None].expand(batch, -1, -1)


def _encode(text: str, tokenizer: str, where: str) -> list[int]:
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(tokenizer).encode(text).ids
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConfigError(where, f"{tokenizer}: cannot encode init_text ({e})") from None
    if not ids:
        raise ConfigError(where, "init_text encodes to no tokens")
    return list(ids)


def apply(model: Model, s: PromptSettings, path: str = "prompt") -> Model:
    """Freeze the model and give its trunk a trainable soft prompt; see the module docstring.

    When `init_text` is tokenized, `s` gains `init_ids` (and loses `tokenizer`), so that the
    recorded transform rebuilds without the file. Raises ConfigError naming `path` for an image
    model, a prompt that does not fit max_seq_len, ids outside the vocabulary, or a trunk that
    already carries virtual tokens."""
    cfg, trunk = model.config, model.transformer
    if cfg.is_image:
        raise ConfigError(path, "prompt tuning needs a text model (gpt, llama, bert)")
    if trunk.prompt is not None or trunk.prefix is not None:
        raise ConfigError(path, "the model already carries a prefix or soft prompt")
    if s.num_virtual_tokens >= cfg.max_seq_len:
        raise ConfigError(
            f"{path}.num_virtual_tokens",
            f"{s.num_virtual_tokens} virtual tokens take every one of the model's {cfg.max_seq_len} positions "
            f"(max_seq_len); use fewer",
        )
    ids = s.init_ids
    if ids is None and s.init_text is not None:
        ids = s.init_ids = _encode(s.init_text, s.tokenizer, f"{path}.init_text")
        s.tokenizer = None
    n = s.num_virtual_tokens
    if ids is None:
        ids = torch.randint(0, cfg.vocab_size, (n,), device="cpu").tolist()  # cpu: also under torch.device("meta")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ConfigError(f"{path}.init_ids", f"id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    extra = trainable_params(model, s.trainable, path)
    freeze_base(model)
    for p in extra:
        p.requires_grad_(True)
    table = model.transformer.tok_embed.weight
    prompt = SoftPrompt(n, cfg.d_model).to(device=table.device, dtype=table.dtype)
    index = torch.tensor([ids[i % len(ids)] for i in range(n)], device=table.device)
    with torch.no_grad():
        prompt.embedding.weight.copy_(table[index])
    trunk.prompt = prompt
    return model


TRANSFORM = Transform(
    "prompt", PromptSettings, apply, training_only=("init_ids", "init_text", "tokenizer", "trainable")
)
