"""Tasks: one file per objective, each holding its head, data, metrics and checks.

    task = get_task("causal_lm")                      # or {"name": ..., option: value}
    model = build_model(model_config, "text_classification")

Adding a task is one new file with a `Task` subclass (see `llm.tasks.base`) and
one line in `TASKS` below; a recipe's `task:` then takes its name and options
(`OPTIONS`, checked when the recipe is loaded).
"""

from __future__ import annotations

from llm.config import OneOf, build_config
from llm.models.base import Model
from llm.models.config import ModelConfig
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
# a recipe's `task:`: a task name, or {name: NAME, option: value, ...} built into that task's Options
OPTIONS = OneOf("name", {name: t.Options for name, t in TASKS.items()}, "task")

__all__ = [
    "OPTIONS",
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


def get_task(spec, path: str = "task") -> Task:
    """A task with its options from a name, a mapping {name: NAME, option: value, ...} or a
    recipe's typed `task:` (see `OPTIONS`).

    Raises ConfigError naming `path` for an unknown name or a bad option."""
    if isinstance(spec, Task):
        return spec
    options = OPTIONS.build(spec, path)
    return TASKS[options.name](options, path)


def build_model(cfg: ModelConfig | dict, task: str | dict | Task = "causal_lm") -> Model:
    """A freshly initialised model of architecture `cfg` with the head of `task`.

    Raises ConfigError when the config is invalid or the task cannot train that architecture."""
    if not isinstance(cfg, ModelConfig):
        cfg = build_config(ModelConfig, cfg, "model")
    return get_task(task).build_model(cfg)


def task_of(model: Model) -> Task:
    """The task (with its options) that `model` was built for."""
    return get_task(model.description()["task"])
