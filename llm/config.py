"""Typed, validated configs and the YAML loader.

Every config is a dataclass. `build_config(cls, data)` turns a plain mapping
(from YAML) into one, field by field: unknown keys, wrong types and values out
of range raise `ConfigError` naming the field's dotted path, so a user sees one
line such as ``model.n_heads: 7 does not divide d_model=768``.

YAML is read with `yaml.safe_load` only; `--set a.b=c` overrides are parsed as
YAML scalars and merged before validation, so they are checked like the file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llm.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message starts with the field's dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# ----------------------------------------------------------------------------
# Generic dataclass construction with type checks
# ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def build_config(cls, data: Any, path: str = ""):
    """Build dataclass `cls` from a mapping, checking keys, types and ranges."""
    if isinstance(data, cls):
        data = dataclasses.asdict(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(fields)})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def _positive(obj, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, _join(path, name), f"must be > 0, got {value}")


def _fraction(obj, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(0.0 <= value < 1.0, _join(path, name), f"must be in [0, 1), got {value}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

Family = Literal["gpt", "llama", "bert", "vit"]
Task = Literal[
    "causal_lm",  # next-token prediction (GPT, LLaMA)
    "pretraining",  # masked LM + next-sentence prediction (BERT)
    "masked_lm",  # masked LM alone
    "encoder",  # the bare stack (+ pooler when configured)
    "sequence_classification",
    "image_classification",
    "masked_image_modeling",
    "contrastive",  # InfoNCE on pooled embeddings, in-batch negatives
]
IMAGE_TASKS = ("image_classification", "masked_image_modeling")


@dataclasses.dataclass
class ModelConfig:
    """One Transformer stack; the fields choose the architecture.

    `family` names the model family for Hugging Face interop and picks the input
    (token ids, or pixels for "vit"); every architectural choice is its own field.
    Post-norm stacks (BERT) normalise the embeddings and have no final norm;
    pre-norm stacks have a final norm and none on the embeddings.
    """

    family: Family = "gpt"
    task: Task = "causal_lm"
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
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = True
    causal: bool = True
    type_vocab_size: int = 0  # BERT segment embeddings; 0 = none
    pooler: bool = False  # dense + tanh over the first token (BERT, ViT)
    pooling: Literal["first", "mean", "last"] = "first"  # how a sequence becomes one vector
    num_labels: int = 2  # classification heads
    temperature: float = 0.05  # contrastive InfoNCE
    image_size: int = 224  # vit only
    patch_size: int = 16  # vit only
    num_channels: int = 3  # vit only
    init_std: float = 0.02
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def is_image(self) -> bool:
        return self.family == "vit"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Longest sequence the stack sees (patches + [CLS] for images)."""
        return self.num_patches + 1 if self.is_image else self.max_seq_len

    def validate(self, path: str = "model") -> None:
        _positive(self, path, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff")
        _positive(self, path, "norm_eps", "rope_theta", "init_std", "temperature", "num_labels")
        _fraction(self, path, "dropout", "attention_dropout")
        _check(
            self.d_model % self.n_heads == 0,
            _join(path, "n_heads"),
            f"{self.n_heads} does not divide d_model={self.d_model}",
        )
        if self.n_kv_heads is not None:
            _check(self.n_kv_heads > 0, _join(path, "n_kv_heads"), f"must be > 0, got {self.n_kv_heads}")
            _check(
                self.n_heads % self.n_kv_heads == 0,
                _join(path, "n_kv_heads"),
                f"{self.n_kv_heads} does not divide n_heads={self.n_heads}",
            )
        if self.position == "rotary":
            _check(
                self.head_dim % 2 == 0,
                _join(path, "position"),
                f"rotary needs an even head dim, got d_model/n_heads = {self.head_dim}",
            )
        if self.position == "sinusoidal":
            _check(self.d_model % 2 == 0, _join(path, "d_model"), "sinusoidal positions need an even d_model")
        _check(self.type_vocab_size >= 0, _join(path, "type_vocab_size"), "must be >= 0")
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check(
                    0 <= value < self.vocab_size,
                    _join(path, name),
                    f"{value} is outside the vocabulary [0, {self.vocab_size})",
                )
        if self.is_image:
            _positive(self, path, "image_size", "patch_size", "num_channels")
            _check(
                self.image_size % self.patch_size == 0,
                _join(path, "patch_size"),
                f"{self.patch_size} does not divide image_size={self.image_size}",
            )
            _check(self.position == "learned", _join(path, "position"), "vit uses learned positions")
            _check(
                self.task in ("encoder", "contrastive") + IMAGE_TASKS,
                _join(path, "task"),
                f"{self.task!r} needs text; a vit model does encoder, contrastive or {' or '.join(IMAGE_TASKS)}",
            )
        else:
            _check(
                self.task not in IMAGE_TASKS,
                _join(path, "task"),
                f"{self.task!r} needs family 'vit', got {self.family!r}",
            )
        if self.task == "causal_lm":
            _check(self.causal, _join(path, "causal"), "causal_lm needs causal: true")
        if self.task in ("pretraining", "masked_lm", "masked_image_modeling"):
            _check(not self.causal, _join(path, "causal"), f"{self.task} needs causal: false")
        if self.task == "pretraining":
            _check(self.pooler, _join(path, "pooler"), "pretraining (MLM + NSP) needs pooler: true")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) to a nested mapping in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override is written key.path=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is {child!r}, not a mapping, so {key} cannot be set")
            node = child
        node[parts[-1]] = value
    return data


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model config file holds the ModelConfig fields at its top level (or under `model:`)."""
    data = load_yaml(path)
    if set(data) == {"model"}:
        data = data["model"]
    apply_overrides(data, overrides or [])
    return build_config(ModelConfig, data, "model")
