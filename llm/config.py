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

IGNORE_INDEX = -100  # the label of positions that carry no loss (PyTorch and Hugging Face agree)


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
                # the error of the member shaped like the value (a list, a mapping) says the most
                shaped = (isinstance(value, list) and typing.get_origin(arg) is list) or (
                    isinstance(value, dict) and (typing.get_origin(arg) is dict or dataclasses.is_dataclass(arg))
                )
                errors.insert(0, e) if shaped else errors.append(e)
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
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in data:
            raise ConfigError(f"{prefix}{name}", "missing")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


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
        _positive(self, path, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff")
        _positive(self, path, "norm_eps", "rope_theta", "init_std")
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
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                _check(
                    0 <= v < self.vocab_size,
                    _join(path, name),
                    f"{v} is outside the vocabulary [0, {self.vocab_size})",
                )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.position, _join(path, "rope_scaling"))
        if self.is_image:
            _positive(self, path, "image_size", "patch_size", "num_channels")
            _check(
                self.image_size % self.patch_size == 0,
                _join(path, "patch_size"),
                f"{self.patch_size} does not divide image_size={self.image_size}",
            )
            _check(self.position == "learned", _join(path, "position"), "vit uses learned positions")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}: first on line {first.start_mark.line + 1}, "
                    f"again on line {key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str):
    """`yaml.safe_load` that raises yaml.YAMLError on a duplicate key (naming it and both lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


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
    _check(position == "rotary", path, f"needs position: rotary, got {position!r}")
    kind = scaling.get("rope_type")
    _check(kind in ROPE_SCALING, _join(path, "rope_type"), f"expected one of {', '.join(ROPE_SCALING)}, got {kind!r}")
    required, optional = ROPE_SCALING[kind]
    for key in sorted(required - set(scaling)):
        raise ConfigError(_join(path, key), f"rope_type {kind!r} needs it")
    for key, value in scaling.items():
        if key == "rope_type":
            continue
        _check(key in required | optional, _join(path, key), f"not a parameter of rope_type {kind!r}")
        if key == "truncate":
            _check(isinstance(value, bool), _join(path, key), f"expected true or false, got {value!r}")
        elif value is not None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            _check(ok, _join(path, key), f"expected a number > 0, got {value!r}")
    if kind != "yarn":
        _check(scaling["factor"] >= 1, _join(path, "factor"), f"must be >= 1, got {scaling['factor']}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely, naming the file in every error (a key given twice is one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        data = safe_load_unique(path.read_text())
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


PRESETS = Path(__file__).resolve().parent / "presets"  # shipped inside the package (package data)


def preset_names(kind: str) -> list[str]:
    """Names of the presets of `kind` ("models" or "deepspeed") that ship with llm."""
    return sorted(p.stem for p in (PRESETS / kind).glob("*.*"))


def find_preset(kind: str, name: str, field: str, base_dir: Path | None = None) -> Path:
    """`name` as a file (as given, or relative to `base_dir`), else the packaged preset of that name.

    Raises ConfigError naming `field` and the known presets when neither exists."""
    suffix = ".json" if kind == "deepspeed" else ".yaml"
    for candidate in (Path(name), base_dir / name if base_dir else None, PRESETS / kind / f"{name}{suffix}"):
        if candidate is not None and candidate.is_file():
            return candidate
    if "/" in name or name.endswith((".json", ".yaml", ".yml")):
        raise ConfigError(name, "file not found")
    raise ConfigError(field, f"{name!r} is neither a file nor a preset (known: {', '.join(preset_names(kind))})")


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model config file (or a preset name such as gpt2-124m) holds the ModelConfig fields at
    its top level (or under `model:`)."""
    data = load_yaml(find_preset("models", str(path), str(path)))
    if set(data) == {"model"}:
        data = data["model"]
    apply_overrides(data, overrides or [])
    return build_config(ModelConfig, data, "model")


# ----------------------------------------------------------------------------
# Training recipes: a whole run (model + data + optimisation + DeepSpeed + checkpoints)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareConfig:
    """How to build the shards when `data.train` is missing (the quickstart's first run)."""

    corpus: Literal["stdlib"] = "stdlib"  # the Python standard library's sources
    limit_bytes: int = 4_000_000
    tokenizer_kind: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: int = 8192
    shard_tokens: int = 1_000_000
    val_fraction: float = 0.02

    def validate(self, path: str = "data.prepare") -> None:
        _positive(self, path, "limit_bytes", "vocab_size", "shard_tokens")
        _check(
            0.0 < self.val_fraction < 1.0, _join(path, "val_fraction"), f"must be in (0, 1), got {self.val_fraction}"
        )


@dataclasses.dataclass
class BlendEntry:
    """One shard directory of a blended training split and its relative weight."""

    path: str
    weight: float = 1.0

    def validate(self, path: str) -> None:
        _check(self.weight >= 0, _join(path, "weight"), f"must be >= 0, got {self.weight}")


@dataclasses.dataclass
class DataConfig:
    """Where batches come from. `source: shards` reads Arrow shard dirs (llm data prepare);
    `source: synthetic` draws reproducible random batches (benchmarks, tests).

    `train` is one shard directory or example file, or a blend: a list of `{path, weight}` read as
    one deterministic weighted mixture (`llm.data.Blend`)."""

    source: Literal["shards", "synthetic"] = "shards"
    # shard dir of the training split, a JSONL/CSV/Parquet file (fine-tuning), or a blend of shard dirs
    train: str | list[BlendEntry] | None = None
    val: str | None = None  # shard dir or file of the validation split (None: no validation)
    tokenizer: str | None = None  # tokenizer.json (generation, preparation)
    text_field: str = "text"  # columns of example files (text_classification, instruction)
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    seq_len: int = 256
    num_workers: int = 0
    prepare: PrepareConfig | None = None

    def validate(self, path: str = "data") -> None:
        _positive(self, path, "seq_len")
        _check(self.num_workers >= 0, _join(path, "num_workers"), f"must be >= 0, got {self.num_workers}")
        if self.source == "shards":
            _check(self.train is not None, _join(path, "train"), "source 'shards' needs a train shard directory")
        if isinstance(self.train, list):
            _check(bool(self.train), _join(path, "train"), "a blend needs at least one {path, weight}")
            _check(sum(e.weight for e in self.train) > 0, _join(path, "train"), "a blend needs a positive total weight")
            _check(self.prepare is None, _join(path, "prepare"), "cannot prepare a blend; prepare each part first")

    @property
    def train_paths(self) -> list[str]:
        """The training shard directories (one, or each part of a blend)."""
        if self.train is None:
            return []
        return [self.train] if isinstance(self.train, str) else [e.path for e in self.train]


@dataclasses.dataclass
class TrainConfig:
    """Batch arithmetic, length, precision and the loop's cadence.

    global batch = micro_batch_size x grad_accum x data-parallel ranks; when
    `global_batch_size` is given it must equal that product (checked at start-up)."""

    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None
    max_steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end (when data.val is set)
    eval_batches: int = 8
    non_finite: Literal["skip", "abort"] = "skip"  # what a NaN/Inf loss does
    max_skips: int = 10  # abort after this many consecutive non-finite micro-batches

    def validate(self, path: str = "train") -> None:
        _positive(self, path, "micro_batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "max_skips")
        _check(self.grad_clip >= 0, _join(path, "grad_clip"), f"must be >= 0, got {self.grad_clip}")
        _check(self.eval_every >= 0, _join(path, "eval_every"), f"must be >= 0, got {self.eval_every}")
        if self.global_batch_size is not None:
            _positive(self, path, "global_batch_size")


@dataclasses.dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (never norms, biases, embeddings)."""

    lr: float = 3e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1

    def validate(self, path: str = "optim") -> None:
        _positive(self, path, "lr", "eps")
        _check(self.weight_decay >= 0, _join(path, "weight_decay"), f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2, _join(path, "betas"), f"expected two numbers, got {self.betas}")
        for i, b in enumerate(self.betas):
            _check(0.0 <= b < 1.0, f"{_join(path, 'betas')}[{i}]", f"must be in [0, 1), got {b}")


@dataclasses.dataclass
class ScheduleConfig:
    """Linear warmup to optim.lr, then cosine or linear decay to min_lr_ratio x lr at decay_steps."""

    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None  # None: train.max_steps
    min_lr_ratio: float = 0.1

    def validate(self, path: str = "schedule") -> None:
        _check(self.warmup_steps >= 0, _join(path, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0, _join(path, "min_lr_ratio"), f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        if self.decay_steps is not None:
            _positive(self, path, "decay_steps")


@dataclasses.dataclass
class DeepSpeedConfig:
    """A preset from configs/deepspeed/ (name or path) with the recipe's choices on top;
    `config` is merged last, key by key, into the DeepSpeed JSON."""

    preset: str = "zero1"
    zero_stage: int | None = None  # None: the preset's stage
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, path: str = "deepspeed") -> None:
        if self.zero_stage is not None:
            _check(self.zero_stage in (0, 1, 2, 3), _join(path, "zero_stage"), f"must be 0-3, got {self.zero_stage}")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    save_final: bool = True

    def validate(self, path: str = "checkpoint") -> None:
        _check(self.every_steps >= 0, _join(path, "every_steps"), f"must be >= 0, got {self.every_steps}")
        _positive(self, path, "keep_last")


@dataclasses.dataclass
class LoggingConfig:
    """Where metrics go besides RUN_DIR/metrics.jsonl: TensorBoard (on by default), and the optional
    trackers Weights & Biases (`pip install llm[wandb]`) and MLflow (`pip install llm[mlflow]`)."""

    tensorboard: bool = True
    wandb: bool = False  # a W&B run under RUN_DIR/wandb
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: nothing leaves the machine (`wandb sync` later)
    mlflow: bool = False  # an MLflow run in mlflow_uri
    mlflow_uri: str | None = None  # tracking URI; None: the local file store RUN_DIR/mlruns
    experiment: str | None = None  # W&B project / MLflow experiment (None: "llm")
    progress: bool = True  # rank 0 progress bar
    sample_prompt: str | None = None  # after training, print a sample generated from this prompt (causal LM)
    sample_tokens: int = 48

    def validate(self, path: str = "logging") -> None:
        _positive(self, path, "sample_tokens")


@dataclasses.dataclass
class FaultConfig:
    heartbeat_timeout_s: float = 30.0  # a rank silent this long is declared dead
    collective_timeout_s: float = 120.0  # torch.distributed timeout

    def validate(self, path: str = "faults") -> None:
        _positive(self, path, "heartbeat_timeout_s", "collective_timeout_s")


ADAPT_METHODS = ("full", "lora", "prefix", "prompt", "freeze")


@dataclasses.dataclass
class DistillConfig:
    """`llm distill`: a teacher's softened logits (and optionally hidden states) guide the recipe's model."""

    teacher: str | None = None  # any path the loader reads; must share the student's tokenizer
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T^2 (Hinton et al. 2015)
    alpha: float = 0.5  # weight of the KL term; (1 - alpha) weighs the hard-label loss
    hidden_mse: float = 0.0  # weight of MSE(projection(student hidden), teacher hidden); 0 = off

    def validate(self, path: str = "distill") -> None:
        _positive(self, path, "temperature")
        _check(0 <= self.alpha <= 1, _join(path, "alpha"), f"must be in [0, 1], got {self.alpha}")
        _check(self.hidden_mse >= 0, _join(path, "hidden_mse"), f"must be >= 0, got {self.hidden_mse}")


@dataclasses.dataclass
class PruneConfig:
    """Gradual magnitude pruning during training (Zhu & Gupta 2017's cubic schedule); sparsity 0 = off."""

    sparsity: float = 0.0  # final fraction of zero weights in the blocks' Linear layers
    start_step: int = 0
    end_step: int = 0  # the schedule reaches `sparsity` here
    every: int = 10  # steps between mask updates
    scope: Literal["layer", "global"] = "layer"

    def validate(self, path: str = "prune") -> None:
        _check(0 <= self.sparsity < 1, _join(path, "sparsity"), f"must be in [0, 1), got {self.sparsity}")
        if self.sparsity:
            _check(self.end_step > self.start_step, _join(path, "end_step"), "must be after start_step")
            _positive(self, path, "every")


@dataclasses.dataclass
class RecipeConfig:
    """A whole run. `model` is a ModelConfig mapping; its optional `base:` key names a
    model YAML (a file, or a preset name such as gpt2-tiny) whose fields the others
    override (resolved before validation). `task` and `transforms` are checked by
    `llm.tasks` and `llm.adapt` when the run is assembled."""

    model: ModelConfig
    # the objective: a task name, or a mapping {name: NAME, option: value, ...} (see llm.tasks)
    task: str | dict[str, Any] = "causal_lm"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run_dir: str = "runs/run"
    seed: int = 1234
    init_from: str | None = None  # an llm model dir or checkpoint to start from (fine-tuning)
    # model transforms applied in order after the model is built, e.g. [{name: freeze, layers: [embeddings]}]
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # fine-tuning method {method: full|lora|prefix|prompt|freeze, setting: value, ...}; the assembly
    # appends {name: method, settings...} to `transforms` (full: nothing)
    adapt: dict[str, Any] | None = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)

    def validate(self, path: str = "") -> None:
        if self.adapt is not None:
            method = self.adapt.get("method")
            _check(
                method in ADAPT_METHODS,
                "adapt.method",
                f"expected one of {', '.join(ADAPT_METHODS)}, got {method!r}",
            )
        if self.model.is_image:
            _check(self.data.source == "synthetic" or self.data.train is not None, "data.train", "needs images")
        elif self.data.seq_len > self.model.max_seq_len and self.model.position in ("learned", "sinusoidal"):
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML, apply `--set` overrides, resolve `model.base`, and validate every field."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return resolve_recipe(data, base_dir=Path(path).parent)


def resolve_recipe(data: dict, base_dir: Path | None = None) -> RecipeConfig:
    data = dict(data)
    model = data.get("model")
    if model is None:
        raise ConfigError("model", "missing (a mapping of model fields, optionally with base: MODEL.yaml)")
    if not isinstance(model, dict):
        raise ConfigError("model", f"expected a mapping, got {type(model).__name__} {model!r}")
    model = dict(model)
    base = model.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError("model.base", f"expected a path or a preset name, got {base!r}")
        merged = load_yaml(find_preset("models", base, "model.base", base_dir))
        merged.update(model)
        model = merged
    data["model"] = model
    return build_config(RecipeConfig, data)
