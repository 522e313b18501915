"""Tasks: one file per objective, each holding its head, data, metrics and checks.

    task = get_task("causal_lm")                      # or {"name": ..., option: value}
    model = build_model(model_config, "text_classification")

Adding a task is one new file with a `Task` subclass (see `llm.tasks.base`) and
one line in `TASKS` below.
"""

from __future__ import annotations

from llm.config import ConfigError, ModelConfig, build_config
from llm.models.base import Model
from llm.tasks.base import Task
from llm.tasks.causal_lm import CausalLM, CausalLMTask
from llm.tasks.contrastive import Contrastive, ContrastiveTask
from llm.tasks.encoder import Encoder, EncoderTask
from llm.tasks.image_classification import ImageClassificationTask, ImageClassifier
from llm.tasks.instruction import InstructionLM, InstructionTask
from llm.tasks.masked_image_modeling import MaskedImageModel, MaskedImageModelingTask
from llm.tasks.masked_lm import MaskedLM, MaskedLMTask
from llm.tasks.text_classification import TextClassificationTask, TextClassifier

TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        CausalLMTask,
        InstructionTask,
        MaskedLMTask,
        TextClassificationTask,
        ImageClassificationTask,
        MaskedImageModelingTask,
        ContrastiveTask,
        EncoderTask,
    )
}

__all__ = [
    "TASKS",
    "CausalLM",
    "Contrastive",
    "Encoder",
    "ImageClassifier",
    "InstructionLM",
    "MaskedImageModel",
    "MaskedLM",
    "TextClassifier",
    "Task",
    "build_model",
    "get_task",
    "task_of",
]


def get_task(spec: str | dict | Task, path: str = "task") -> Task:
    """A task with its options from a name or a mapping {name: NAME, option: value, ...}.

    Raises ConfigError naming `path` for an unknown name or a bad option."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(path, f"expected a task name or a mapping with name:, got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in TASKS:
        raise ConfigError(path, f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name](options, path)


def build_model(cfg: ModelConfig | dict, task: str | dict | Task = "causal_lm") -> Model:
    """A freshly initialised model of architecture `cfg` with the head of `task`.

    Raises ConfigError when the config is invalid or the task cannot train that architecture."""
    if not isinstance(cfg, ModelConfig):
        cfg = build_config(ModelConfig, cfg, "model")
    return get_task(task).build_model(cfg)


def task_of(model: Model) -> Task:
    """The task (with its options) that `model` was built for."""
    return get_task(model.description()["task"])
