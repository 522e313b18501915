"""`ModelConfig`: the architecture of one Transformer stack, and model config files.

A model config file (or a packaged preset such as gpt2-124m, llm/presets/models/) holds the
ModelConfig fields at its top level or under `model:`; a recipe's `model:` section holds them too,
optionally over a `base:` preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from llm.config import (
    ConfigError,
    apply_overrides,
    build_config,
    check,
    find_preset,
    fraction,
    join,
    load_yaml,
    positive,
)

Family = Literal["gpt", "llama", "bert", "vit"]
PIXEL_FAMILIES = ("vit",)  # families whose trunk reads pixels (patch embeddings), not token ids


@dataclasses.dataclass
class ModelConfig:
    """One Transformer stack; the fields choose the architecture, nothing else.

    `family` names the model family for Hugging Face interop and picks the input
    (token ids, or pixels for "vit"); every architectural choice is its own field.
    Post-norm stacks (BERT) normalise the embeddings and have no final norm;
    pre-norm stacks have a final norm and none on the embeddings. What the model
    is trained for (its head, loss and data) is the task's: see `llm.tasks`.
    """

    family: Family = "gpt"
    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: as many as n_heads (MHA); 1: MQA; between: GQA
    d_ff: int = 3072
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    position: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
    rope_theta: float = 10000.0
    # Hugging Face's rope_scaling dict: {rope_type: linear | dynamic | llama3 | yarn, factor: ..., ...}
    rope_scaling: dict[str, Any] | None = None
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    bias: bool = True
    qkv_bias: bool | None = None  # None: as `bias`; Qwen2 has q/k/v biases and no others
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = True
    causal: bool = True
    type_vocab_size: int = 0  # BERT segment embeddings; 0 = none
    pooler: bool = False  # dense + tanh over the first token (BERT, ViT)
    image_size: int = 224  # vit only
    patch_size: int = 16  # vit only
    num_channels: int = 3  # vit only
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list: generation stops at any (Llama-3-Instruct)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def attn_bias(self) -> bool:
        """Whether the q/k/v projection has a bias."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a sequence (empty when none is known)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def is_image(self) -> bool:
        return self.family in PIXEL_FAMILIES

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Longest sequence the stack sees (patches + [CLS] for images)."""
        return self.num_patches + 1 if self.is_image else self.max_seq_len

    def validate(self, path: str = "model") -> None:
        positive(self, path, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff")
        positive(self, path, "norm_eps", "rope_theta", "init_std")
        fraction(self, path, "dropout", "attention_dropout")
        check(
            self.d_model % self.n_heads == 0,
            join(path, "n_heads"),
            f"{self.n_heads} does not divide d_model={self.d_model}",
        )
        if self.n_kv_heads is not None:
            check(self.n_kv_heads > 0, join(path, "n_kv_heads"), f"must be > 0, got {self.n_kv_heads}")
            check(
                self.n_heads % self.n_kv_heads == 0,
                join(path, "n_kv_heads"),
                f"{self.n_kv_heads} does not divide n_heads={self.n_heads}",
            )
        if self.position == "rotary":
            check(
                self.head_dim % 2 == 0,
                join(path, "position"),
                f"rotary needs an even head dim, got d_model/n_heads = {self.head_dim}",
            )
        if self.position == "sinusoidal":
            check(self.d_model % 2 == 0, join(path, "d_model"), "sinusoidal positions need an even d_model")
        check(self.type_vocab_size >= 0, join(path, "type_vocab_size"), "must be >= 0")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                check(
                    0 <= v < self.vocab_size,
                    join(path, name),
                    f"{v} is outside the vocabulary [0, {self.vocab_size})",
                )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.position, join(path, "rope_scaling"))
        if self.is_image:
            positive(self, path, "image_size", "patch_size", "num_channels")
            check(
                self.image_size % self.patch_size == 0,
                join(path, "patch_size"),
                f"{self.patch_size} does not divide image_size={self.image_size}",
            )
            check(self.position == "learned", join(path, "position"), "vit uses learned positions")


# Parameters each rope scaling type needs (required, optional), as Hugging Face names them;
# the formulas are in llm.models.layers.rope_frequencies.
ROPE_SCALING = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, {"original_max_position_embeddings"}),
    "llama3": (
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
        set(),
    ),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"},
    ),
}


def _check_rope_scaling(scaling: dict, position: str, path: str) -> None:
    check(position == "rotary", path, f"needs position: rotary, got {position!r}")
    kind = scaling.get("rope_type")
    check(kind in ROPE_SCALING, join(path, "rope_type"), f"expected one of {', '.join(ROPE_SCALING)}, got {kind!r}")
    required, optional = ROPE_SCALING[kind]
    for key in sorted(required - set(scaling)):
        raise ConfigError(join(path, key), f"rope_type {kind!r} needs it")
    for key, value in scaling.items():
        if key == "rope_type":
            continue
        check(key in required | optional, join(path, key), f"not a parameter of rope_type {kind!r}")
        if key == "truncate":
            check(isinstance(value, bool), join(path, key), f"expected true or false, got {value!r}")
        elif value is not None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            check(ok, join(path, key), f"expected a number > 0, got {value!r}")
    if kind != "yarn":
        check(scaling["factor"] >= 1, join(path, "factor"), f"must be >= 1, got {scaling['factor']}")


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model config file (or a preset name such as gpt2-124m) holds the ModelConfig fields at
    its top level (or under `model:`)."""
    data = load_yaml(find_preset("models", str(path), str(path)))
    if set(data) == {"model"}:
        data = data["model"]
    apply_overrides(data, overrides or [])
    return build_config(ModelConfig, data, "model")
