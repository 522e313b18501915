"""What a family adapter is: everything Hugging Face knows about one model family, in one class.

A subclass sets the class attributes (model types, architectures, trunk prefix, the fields
an export fixes, ...) and implements the weight rules and the config.json fields both ways;
`config_from_hf` and `config_to_hf` add what every family shares. Format writers (Hugging
Face, and on top of it compressed-tensors, GGUF, ...) ask an adapter for names and config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llm.errors import UserError
from llm.models.config import ModelConfig
from llm.models.hf.rules import Rule

# Hugging Face activation names -> our `mlp`: each spelling in transformers' ACT2FN of the erf GELU
# or of its tanh approximation
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
}


def activation(name: str, where: str) -> str:
    """Our `mlp` for a Hugging Face activation name; UserError naming `where` for one we lack."""
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: activation {name!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {message}")


def special_tokens(cfg: ModelConfig) -> dict:
    """bos/eos/pad ids as config.json and generation_config.json spell them (eos an int or a list)."""
    return dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


@dataclass(frozen=True)
class ClassifierHead:
    """transformers' sequence classifier of a family (`GPT2ForSequenceClassification`, ...):
    the token it pools ("first", or "last": the last one that is not pad_token_id), its
    linear layer's name and bias, and whether it reads through the trunk's pooler (BERT)."""

    pooling: str
    name: str
    bias: bool
    pooler: bool = False


@dataclass(frozen=True)
class GGUFLayout:
    """How one of llama.cpp's architectures holds a model of the family (llama.cpp's convert_hf_to_gguf.py):
    `arch` is its name; `fused_qkv`: one attn_qkv matrix, else attn_q, attn_k and attn_v; `adjacent_rotary`:
    it rotates adjacent pairs (2i, 2i + 1), so the rows of q and k are re-paired from our (i, i + d/2);
    `full_heads`: its shapes assume n_heads * head_dim == d_model (no structurally pruned heads)."""

    arch: str
    fused_qkv: bool = False
    adjacent_rotary: bool = False
    full_heads: bool = False


class FamilyAdapter:
    """One model family's Hugging Face mapping; one instance per family in `llm.models.hf.ADAPTERS`."""

    family: ClassVar[str]  # our ModelConfig.family
    # Hugging Face model_type -> the architecture a config.json without "architectures" stands for
    model_types: ClassVar[dict[str, str]]
    # Hugging Face architecture -> (our task, the task options it implies); a task exports as its first match
    architectures: ClassVar[dict[str, tuple[str, dict]]]
    prefix: ClassVar[str]  # where the trunk sits inside a head model's state dict ("transformer." for GPT-2)
    export_fields: ClassVar[dict]  # ModelConfig fields that every architecture of the family fixes
    classifier: ClassVar[ClassifierHead | None] = None  # its sequence classifier, if transformers has one
    ignored_suffixes: ClassVar[tuple[str, ...]] = ()  # buffers some checkpoints carry and nothing needs
    legacy_names: ClassVar[dict[str, str]] = {}  # old spellings inside checkpoint tensor names -> today's
    bos_is_eos: ClassVar[bool] = False  # its tokenizer begins documents with EOS (GPT-2): bos defaults to eos

    def trunk_rules(self, cfg: ModelConfig, mask_token: bool = False) -> list[Rule]:
        """Every trunk tensor (and the pooler) of `cfg` and where it lives under `prefix`;
        `mask_token`: the trunk carries a learned mask token (masked image modeling)."""
        raise NotImplementedError

    def fields_from_hf(self, config: dict, where: str) -> dict:
        """The family's ModelConfig fields for a config.json (UserError naming `where` for one we lack)."""
        raise NotImplementedError

    def fields_to_hf(self, cfg: ModelConfig) -> dict:
        """The family's config.json entries for `cfg`."""
        raise NotImplementedError

    def config_from_hf(self, config: dict, where: str) -> dict:
        """Our ModelConfig fields (a dict, validated later) for a Hugging Face config.json;
        `pooler` and the special ids are left to the caller (the weights and generation_config.json say)."""
        fields = self.fields_from_hf(config, where)
        return dict(family=self.family, init_std=config.get("initializer_range", 0.02), **fields)

    def config_to_hf(self, cfg: ModelConfig, arch: str) -> dict:
        """config.json for `cfg` as `transformers` writes it for `arch`."""
        out = {"architectures": [arch], "model_type": self.model_type(cfg), "initializer_range": cfg.init_std}
        out.update(self.fields_to_hf(cfg))
        if not cfg.is_image:
            out.update(special_tokens(cfg))
        return out

    def architecture_named(self, config: dict) -> str | None:
        """The architecture a config.json of this family names: its first "architectures" entry, else
        its model_type's default."""
        archs = config.get("architectures") or []
        return archs[0] if archs else self.model_types.get(config.get("model_type"))

    def model_type(self, cfg: ModelConfig) -> str:
        """The model_type `cfg` exports as."""
        return next(iter(self.model_types))

    def architecture(self, cfg: ModelConfig, task: str, options: dict) -> str | None:
        """The architecture a model of `cfg` for `task` with `options` exports as: the first of
        `architectures` for that task whose implied options `options` has (None: none)."""
        for arch, (name, implied) in self.architectures.items():
            if name == task and all(options.get(k) == v for k, v in implied.items()):
                return arch
        return None

    def gguf_layout(self, cfg: ModelConfig) -> GGUFLayout:
        """llama.cpp's architecture for a causal LM of `cfg`; UserError naming what it cannot hold."""
        raise UserError(f"llama.cpp has no architecture that llm writes for the {self.family!r} family")

    def check_exportable(self, cfg: ModelConfig, arch: str) -> None:
        """Raise a UserError naming the first field of `cfg` that `arch` cannot express."""
        for name, value in self.export_fields.items():
            if getattr(cfg, name) != value:
                raise UserError(f"model.{name}: {arch} needs {value!r}, got {getattr(cfg, name)!r}")


def check_gelu_stack(cfg: ModelConfig, arch: str) -> None:
    """What GPT-2, BERT and ViT lack: rotary scaling, q/k norms, q/k/v biases apart from the others, SwiGLU."""
    if cfg.rope_scaling is not None:
        raise UserError(f"model.rope_scaling: {arch} has no rotary positions")
    if cfg.qk_norm:
        raise UserError("model.qk_norm: only Qwen3 has q/k norms, and it has no biases (set bias: false)")
    if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias:
        raise UserError(f"model.qkv_bias: {arch} cannot have q/k/v biases differ from the others' ({cfg.bias})")
    if cfg.mlp == "swiglu":
        raise UserError(f"model.mlp: 'swiglu' has no {arch} equivalent (expected gelu or gelu_tanh)")
