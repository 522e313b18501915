"""Checks of a recipe that need no process group: files, cross-field agreements, a resume's checkpoint.

`check_recipe` in `llm.run.train` calls `check_paths` and `launcher_world_size`, and `train`
calls `check_resume`, all before `distributed(...)` starts, so a wrong path, a vocabulary
that does not fit or a global batch that does not divide fails in well under a second with
one line naming the field, instead of after DeepSpeed has started (or, for the tokenizer,
after training has finished).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import yaml

from llm.config import ConfigError, load_yaml
from llm.errors import UserError
from llm.run.recipe import RecipeConfig

# MPI launchers' world-size variables (Open MPI, MPICH/Hydra PMI, MVAPICH); torchrun and deepspeed set WORLD_SIZE
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_world_size() -> int:
    """The number of ranks a launcher announced in the environment (1 when started alone)."""
    for name in WORLD_SIZE_VARS:
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise UserError(f"${name}: expected an integer world size, got {value!r}") from None
    return 1


def _will_prepare(recipe: RecipeConfig) -> bool:
    """Whether the run's first rank will build tokenizer and shards from `data.prepare`."""
    data = recipe.data
    return data.source == "shards" and data.prepare is not None and not Path(data.train).exists()


def _tokenizer_vocab(path: Path) -> tuple[int, str]:
    from llm.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    return tok.vocab_size, tok.sha256


def reads_files(task) -> bool:
    """Whether `task` also reads example files and folders (JSONL, CSV, Parquet, images), not only shards."""
    from llm.tasks.base import Task

    return type(task).file_stream is not Task.file_stream


def check_paths(recipe: RecipeConfig, task) -> None:
    """Every file the run will read exists (or `data.prepare` will make it), and the vocabularies agree:
    tokenizer <= model.vocab_size, each shard directory's manifest and ids fit model.vocab_size;
    `init_from` and `distill.teacher` are models (`check_model_path`), the teacher shares the tokenizer.

    Raises ConfigError naming the field (data.train[i].path, data.val, data.tokenizer, model.vocab_size,
    init_from, distill.teacher, ...)."""
    data, model = recipe.data, recipe.model
    prepare = _will_prepare(recipe)
    vocab = model.vocab_size
    if recipe.init_from:
        check_model_path("init_from", recipe.init_from)
    if recipe.distill.teacher:
        check_teacher(recipe)
    if prepare and not model.is_image and data.prepare.vocab_size > vocab:
        raise ConfigError(
            "data.prepare.vocab_size", f"{data.prepare.vocab_size} tokens do not fit model.vocab_size={vocab}"
        )

    _check_tokenizer(recipe, task, prepare)
    if data.source == "shards" and not prepare:
        _check_shards(recipe, task)


def check_model_path(field: str, path: str) -> Path:
    """`path` is something `llm.run.loader.load_model` reads: an llm model directory, a Hugging Face
    directory, or a run/checkpoint directory with an intact checkpoint. Returns the file describing the
    model (config.yaml, config.json or the checkpoint's model.yaml). Raises ConfigError naming `field`."""
    from llm.run import loader
    from llm.train import checkpoint as ckpt

    try:
        kind = loader.model_kind(path)
        if kind == "hf":
            return Path(path) / "config.json"
        if kind == "llm":
            return Path(path) / loader.CONFIG
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader repeats them when it loads
            step_dir = ckpt.find_checkpoint(loader.checkpoint_dir(Path(path)))
    except UserError as e:
        raise ConfigError(field, str(e)) from None
    if not (step_dir / "model.yaml").is_file():
        raise ConfigError(field, f"{step_dir}: no model.yaml (not a checkpoint written by llm)")
    return step_dir / "model.yaml"


def _described_vocab(description: Path) -> int | None:
    import json

    try:
        if description.suffix == ".json":
            return int(json.loads(description.read_text())["vocab_size"])
        return int(yaml.safe_load(description.read_text())["model"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None  # the loader names what is wrong when it reads the model


def check_teacher(recipe: RecipeConfig) -> None:
    """`distill.teacher` is a model with the student's vocabulary size and the student's tokenizer
    (the same tokenizer.json beside it, by sha256). Raises ConfigError naming distill.teacher."""
    from llm.data.tokenizer import Tokenizer
    from llm.run import loader

    path = recipe.distill.teacher
    teacher_vocab = _described_vocab(check_model_path("distill.teacher", path))
    if teacher_vocab is not None and teacher_vocab != recipe.model.vocab_size:
        raise ConfigError(
            "distill.teacher",
            f"{path}: the teacher's vocabulary has {teacher_vocab} tokens, the student's "
            f"{recipe.model.vocab_size}; teacher and student must share the tokenizer",
        )
    own = recipe.data.tokenizer if recipe.data.tokenizer and Path(recipe.data.tokenizer).is_file() else None
    theirs = loader.find_tokenizer(path)
    if (own is None) != (theirs is None) or (own and Tokenizer(own).sha256 != Tokenizer(theirs).sha256):
        raise ConfigError(
            "distill.teacher",
            f"{path}: the teacher's tokenizer ({theirs or 'none found beside it'}) is not the student's "
            f"data.tokenizer ({own or 'none'}); teacher and student must share the tokenizer",
        )


def run_task(recipe: RecipeConfig):
    """The recipe's task with what the run decides before it starts (`Task.with_data`): a classifier's
    label map is the recipe's `labels`, else that of the model the run starts from (`init_from`, else
    `distill.teacher`) where its training data's labels are among them, else the data's. A distillation
    teacher that classifies must name the same classes in the same order as the student (the KL term
    compares their logits class by class). Raises ConfigError naming the field."""
    from llm.run import loader
    from llm.tasks import get_task
    from llm.tasks.classification import ClassificationTask

    starts = {}
    for field, path in (("init_from", recipe.init_from), ("distill.teacher", recipe.distill.teacher)):
        if path:
            try:
                starts[field] = loader.load_task(path)
            except UserError as e:
                raise ConfigError(field, str(e)) from None
    start = starts.get("init_from") or starts.get("distill.teacher")
    task = get_task(recipe.task).with_data(recipe.data, start)
    teacher = starts.get("distill.teacher")
    if isinstance(task, ClassificationTask) and isinstance(teacher, ClassificationTask):
        ours, theirs = task.label_names(), teacher.label_names()
        unnamed = task.options.labels is None or teacher.options.labels is None
        if len(ours) != len(theirs) or (not unnamed and ours != theirs):
            raise ConfigError(
                "distill.teacher",
                f"{recipe.distill.teacher}: the teacher's labels ({', '.join(theirs)}) are not the student's "
                f"({', '.join(ours)}) in the same order; the KL term compares their logits class by class",
            )
    return task


def _check_shards(recipe: RecipeConfig, task) -> None:
    from llm.data.shards import MANIFEST, ShardError, check_vocab, load_manifest

    data, model = recipe.data, recipe.model
    vocab = model.vocab_size
    files = reads_files(task)
    fields = [f"data.train[{i}].path" for i in range(len(data.train))] if isinstance(data.train, list) else []
    named = list(zip(fields or ["data.train"], data.train_paths))
    if data.val is not None:
        named.append(("data.val", data.val))
    for field, path in named:
        if not (Path(path) / MANIFEST).is_file():
            if files and Path(path).exists():
                continue  # an example file or image folder: the task reads (and checks) it when it loads
            what = "no such directory" if not Path(path).exists() else f"no {MANIFEST} in it"
            if files and not Path(path).exists():
                what = "no such file or directory"
            hint = " and data.prepare is not set" if field == "data.train" else ""
            made = "`llm data prepare`" + (f", or an example file task {task.name!r} reads" if files else "")
            raise ConfigError(field, f"{path}: {what}{hint} (make shards with {made})")
        if model.is_image:
            continue
        try:
            check_vocab(path, vocab)
        except ShardError as e:
            raise ConfigError(field, str(e)) from None
        if data.document_mask and load_manifest(path)["tokenizer"].get("eos_id") is None:
            raise ConfigError(
                "data.document_mask",
                f"{path}: the manifest names no EOS id, so its documents cannot be told apart "
                "(prepare the shards with a tokenizer that has an EOS token)",
            )


def _check_tokenizer(recipe: RecipeConfig, task, prepare: bool) -> None:
    from llm.data.shards import MANIFEST, ShardError, load_manifest

    data, model = recipe.data, recipe.model
    vocab = model.vocab_size
    needs_tokenizer = recipe.logging.sample_prompt is not None and task.name == "causal_lm"
    text_files = [
        p for p in data.train_paths + [data.val] * (data.val is not None) if Path(p).is_file()
    ] if data.source == "shards" and reads_files(task) and not model.is_image else []  # fmt: skip
    if data.tokenizer is None:
        if needs_tokenizer and data.source == "shards":
            raise ConfigError("data.tokenizer", "needed to decode logging.sample_prompt's sample (or set it to null)")
        if text_files:
            raise ConfigError("data.tokenizer", f"needed to tokenize {text_files[0]} (task {task.name!r})")
        if prepare:
            raise ConfigError("data.tokenizer", "needed by data.prepare (where the tokenizer is written or read)")
        return
    tokenizer = Path(data.tokenizer)
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if not tokenizer.is_file():
        if prepare:
            return  # data.prepare trains it
        if data.source == "synthetic" and not needs_tokenizer:
            return
        if model.is_image and not needs_tokenizer:
            return
        made_with = ""
        if data.source == "shards":
            try:
                made_with = load_manifest(data.train_paths[0])["tokenizer"].get("path") or ""
            except (ShardError, UserError, KeyError):
                made_with = ""
        hint = f"; the shards were made with {made_with}" if made_with else ""
        raise ConfigError("data.tokenizer", f"{data.tokenizer}: tokenizer file not found{hint}")
    size, sha = _tokenizer_vocab(tokenizer)
    if size > vocab:
        raise ConfigError("model.vocab_size", f"{vocab} is smaller than the tokenizer's {size} ids ({tokenizer})")
    if data.source == "shards" and not prepare and not model.is_image:
        for path in data.train_paths:
            if not (Path(path) / MANIFEST).is_file():
                continue  # named by the shard check
            made = load_manifest(path)["tokenizer"].get("sha256")
            if made not in (None, "none", sha):
                warnings.warn(
                    f"data.tokenizer: {tokenizer} is not the tokenizer {path} was made with (sha256 differs); "
                    "samples will be decoded with it",
                    stacklevel=2,
                )


# transforms that put virtual tokens in front of every sequence (a sequence-parallel slice has no front)
VIRTUAL_TOKEN_TRANSFORMS = ("prefix", "prompt")


def check_parallel(recipe: RecipeConfig, task, world_size: int) -> None:
    """The `parallel:` sizes fit the launch, the model and the run (`llm.train.parallel`): sequence x tensor
    divides `world_size`; the model's heads (and MLP width) divide over the groups (`check_model`); sequence
    parallelism gets a task whose loss is per token (`Task.sequence_parallel`) and no virtual tokens or
    teacher; tensor parallelism a task it splits (`Task.tensor_parallel`), no transform, pruning, teacher or
    attention dropout (ZeRO-3 is refused with the DeepSpeed JSON: `llm.train.engine.deepspeed_config`).
    Raises ConfigError naming the field."""
    from llm.train.parallel import Mesh, check_model

    p = recipe.parallel
    Mesh.of(p, world_size)
    if p.tensor > 1:
        check_tensor_parallel(recipe, task)
    if p.sequence > 1 and not task.sequence_parallel:
        raise ConfigError(
            "parallel.sequence",
            f"{p.sequence}: task {task.name!r} does not split its sequences over ranks (sequence parallelism trains "
            "tasks whose loss is a mean over per-token labels: causal_lm, instruction)",
        )
    check_model(p, recipe.model)
    if p.sequence == 1:
        return
    for path, settings in recipe.transform_settings():
        if settings.name in VIRTUAL_TOKEN_TRANSFORMS:
            raise ConfigError(
                path, f"{settings.name} tuning puts virtual tokens before each sequence, which parallel.sequence splits"
            )
    if recipe.distill.teacher:
        raise ConfigError("distill.teacher", "the teacher runs on whole sequences; distill with parallel.sequence: 1")


def check_tensor_parallel(recipe: RecipeConfig, task) -> None:
    """What tensor parallelism (`llm.train.tensor_parallel`) cannot split: see `check_parallel`."""
    t = recipe.parallel.tensor
    if not task.tensor_parallel:
        raise ConfigError(
            "parallel.tensor", f"{t}: task {task.name!r} is not trained tensor-parallel (causal_lm and instruction are)"
        )
    steps = recipe.transform_settings()
    if steps:
        path, settings = steps[0]
        raise ConfigError(path, f"{settings.name}: tensor parallelism splits the model's own linear layers only")
    if recipe.prune.sparsity:
        raise ConfigError("prune", "gradual pruning masks whole weights; prune with parallel.tensor: 1")
    if recipe.distill.teacher:
        raise ConfigError("distill.teacher", "distillation runs with parallel.tensor: 1")
    if recipe.model.attention_dropout:
        raise ConfigError(
            "model.attention_dropout",
            f"{recipe.model.attention_dropout}: every rank of a tensor group would drop the same positions of its "
            "own heads; set it to 0 under parallel.tensor",
        )


def check_document_mask(recipe: RecipeConfig, task) -> None:
    """`data.document_mask` needs a task that reads packed documents (`Task.packs_documents`)."""
    if recipe.data.document_mask and not task.packs_documents:
        raise ConfigError(
            "data.document_mask", f"task {task.name!r} does not pack documents into rows (causal_lm does)"
        )


def check_trackers(recipe: RecipeConfig) -> None:
    """The optional trackers the recipe turns on are installed."""
    import importlib.util

    for field, package in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(recipe.logging, field) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.{field}", f"true needs the {package} package (pip install 'llm[{package}]')")


def resume_checkpoint(recipe: RecipeConfig, resume: str) -> Path | None:
    """The step directory `--resume` would load (None: a fresh start)."""
    from llm.train import checkpoint as ckpt

    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = Path(recipe.run_dir) / "checkpoints"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the trainer repeats these when it resumes
            if not ckpt_dir.is_dir() or not ckpt.complete_steps(ckpt_dir):
                return None
            return ckpt.find_checkpoint(ckpt_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ckpt.find_checkpoint(resume)


def check_resume(recipe: RecipeConfig, resume: str, task=None) -> Path | None:
    """Compare the recipe with the one saved in the checkpoint it would resume from, as the trainer
    will (`llm.train.recipe_change.check_resume`): a field that may not change on resume, or a global
    batch that differs for the launcher's world size, raises a ConfigError naming the field. `task`:
    the checked task, whose options (a label map read from the data) the run records (None: made here).
    Returns that checkpoint (None for a fresh start)."""
    from llm.train import checkpoint as ckpt
    from llm.train import recipe_change

    step_dir = resume_checkpoint(recipe, resume)
    if step_dir is None or not (step_dir / "recipe.yaml").is_file():
        return step_dir
    saved = load_yaml(step_dir / "recipe.yaml")
    current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    if task is None:
        task = run_task(recipe)
    current["task"] = task.to_dict()  # as the run records it (see llm.run.train.assemble)
    state = ckpt.trainer_state(step_dir, 0)
    saved_world = state.get("world_size") or len(list(step_dir.glob("trainer_rank_*.pt")))
    recipe_change.check_resume(saved, current, str(step_dir), saved_world, launcher_world_size())
    return step_dir
