"""The recipe: a whole run, composed from the sections of the code that reads them.

Each section is a dataclass beside its code: `model:` (llm.models.config), `data:`
(llm.data.config), `train:` and `checkpoint:` (llm.train.config), `optim:` and `schedule:`
(llm.train.schedule), `deepspeed:` (llm.train.engine), `parallel:` (llm.train.parallel),
`logging:` (llm.train.trackers),
`faults:` (llm.train.distributed), `distill:` (llm.compress.distill), `prune:`
(llm.compress.prune). The plug-ins resolve through their registries as the recipe loads, into
typed settings: `task:` (llm.tasks.OPTIONS), `transforms[i]` (llm.transforms.SETTINGS) and
`adapt:` (llm.adapt.METHODS). So every check of a setting runs in `load_recipe` (and
`--dry-run`), before any process group, naming the path as the user wrote it.

`dataclasses.asdict(recipe)` is the recipe as RUN_DIR/recipe.yaml records it, and it loads again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

from llm import adapt, kernels, tasks, transforms
from llm.adapt.base import record
from llm.compress.distill import DistillConfig
from llm.compress.prune import PruneConfig
from llm.config import ConfigError, apply_overrides, build_config, check, fields_set, load_yaml, with_base
from llm.data.config import DataConfig
from llm.errors import UserError
from llm.models.config import ModelConfig
from llm.run import loader
from llm.train.config import CheckpointConfig, TrainConfig
from llm.train.distributed import FaultConfig
from llm.train.engine import DeepSpeedConfig
from llm.train.parallel import ParallelConfig
from llm.train.schedule import OptimConfig, ScheduleConfig
from llm.train.trackers import LoggingConfig

TaskSettings = Annotated[Any, tasks.OPTIONS]
TransformSettings = Annotated[Any, transforms.SETTINGS]
AdaptSettings = Annotated[Any, adapt.METHODS]


@dataclasses.dataclass
class RecipeConfig:
    """A whole run. `model` is a ModelConfig mapping; its optional `base:` key names a model YAML
    (a file, or a preset name such as gpt2-tiny) whose fields the others override."""

    model: ModelConfig
    # the objective: a task name, or {name: NAME, option: value, ...} (see llm.tasks)
    task: TaskSettings = dataclasses.field(default_factory=lambda: tasks.OPTIONS.build("causal_lm", "task"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run_dir: str = "runs/run"
    seed: int = 1234
    init_from: str | None = None  # an llm model dir or checkpoint to start from (fine-tuning)
    # model transforms applied in order after the model is built, e.g. [{name: freeze, layers: [embeddings]}]
    transforms: list[TransformSettings] = dataclasses.field(default_factory=list)
    # fine-tuning method {method: full|freeze|lora|prefix|prompt, setting: value, ...}: one more
    # transform after `transforms` (full: none)
    adapt: AdaptSettings | None = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)  # op -> backend (llm.kernels.OPS)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)

    def validate(self, path: str = "") -> None:
        if self.model.is_image:
            check(self.data.source == "synthetic" or self.data.train is not None, "data.train", "needs images")
        elif self.data.seq_len > self.model.max_seq_len and self.model.position in ("learned", "sinusoidal"):
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        for op, backend in self.kernels.items():
            try:
                kernels.check_names({op: backend})
            except ValueError as e:
                raise ConfigError(f"kernels.{op}", str(e)) from None

    def as_recorded(self, saved: dict) -> dict:
        """A recipe mapping saved by an earlier run (a checkpoint's recipe.yaml) in the form this
        recipe is recorded in: every setting checked and every default filled in, so that a resume
        compares settings, not spellings (a recipe saved before defaults were recorded resumes).
        The saved mapping as it is where it no longer builds (the comparison then names the field)."""
        try:
            return dataclasses.asdict(resolve_recipe(saved))
        except ConfigError:
            return saved

    def transform_settings(self) -> list[tuple[str, Any]]:
        """(path as the user wrote it, settings) of each transform the run applies, in order: its
        `transforms:`, then its `adapt:` method as the transform of that name (full: none)."""
        steps = [(f"transforms[{i}]", s) for i, s in enumerate(self.transforms)]
        a = self.adapt
        if a is not None and a.method != "full":
            given = {k: v for k, v in dataclasses.asdict(a).items() if k in fields_set(a) and k != "method"}
            steps.append(("adapt", transforms.SETTINGS.build({"name": a.method, **given}, "adapt")))
        return steps


def recipe_transforms(recipe: RecipeConfig) -> list[dict]:
    """The records ({name: NAME, setting: value, ...}) of the transforms the recipe's model gets."""
    return [record(s) for _, s in recipe.transform_settings()]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML, apply `--set` overrides, resolve `model.base`, and check every field."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return resolve_recipe(data, base_dir=Path(path).parent)


def resolve_recipe(data: dict, base_dir: Path | None = None) -> RecipeConfig:
    """The recipe of a mapping: `model.base` resolved (relative to `base_dir`), every field checked."""
    data = dict(data)
    model = data.get("model")
    if model is None:
        raise ConfigError("model", "missing (a mapping of model fields, optionally with base: MODEL.yaml)")
    if not isinstance(model, dict):
        raise ConfigError("model", f"expected a mapping, got {type(model).__name__} {model!r}")
    data["model"] = with_base(model, "models", "model", base_dir)
    return build_config(RecipeConfig, data)


# ----------------------------------------------------------------------------
# Fine-tuning recipes: the model comes from init_from
# ----------------------------------------------------------------------------


def load_finetune_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """A fine-tuning recipe YAML (+ `--set` overrides); see `finetune_recipe`."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return finetune_recipe(data, base_dir=Path(path).parent)


# model fields a fine-tuning recipe may change: regularisation, not the shape
TUNABLE_MODEL_FIELDS = ("dropout", "attention_dropout")


def finetune_recipe(data: dict, base_dir: Path | None = None) -> RecipeConfig:
    """A recipe mapping whose model comes from `init_from`.

    The model's fields are those of the model at `init_from`; a `model:` section may only
    repeat them (or set dropout), anything else is a ConfigError naming the field. Without
    `data.tokenizer`, the tokenizer.json beside `init_from` is used."""
    data = dict(data)
    source = data.get("init_from")
    if not source or not isinstance(source, str):
        raise ConfigError(
            "init_from",
            "fine-tuning starts from a model: an llm model, run or checkpoint directory, or a Hugging Face directory",
        )
    try:
        theirs = loader.load_model(source).description()["model"]
    except UserError as e:
        raise ConfigError("init_from", str(e)) from None
    own = data.get("model") or {}
    if not isinstance(own, dict):
        raise ConfigError("model", f"expected a mapping, got {type(own).__name__} {own!r}")
    own = with_base(own, "models", "model", base_dir)
    for key, value in own.items():
        if key in theirs and value != theirs[key] and key not in TUNABLE_MODEL_FIELDS:
            raise ConfigError(
                f"model.{key}",
                f"{value!r} contradicts init_from {source}, whose model has {key}: {theirs[key]!r} "
                "(a fine-tuning recipe takes the model from init_from; leave model: out)",
            )
    data["model"] = {**theirs, **own}
    section = data.get("data")
    if isinstance(section, dict) and not section.get("tokenizer"):
        found = loader.find_tokenizer(source)
        if found is not None:
            data["data"] = {**section, "tokenizer": str(found)}
    return resolve_recipe(data, base_dir)
