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

from llm.config import ConfigError, RecipeConfig
from llm.errors import UserError

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


def check_paths(recipe: RecipeConfig, task_name: str) -> None:
    """Every file the run will read exists (or `data.prepare` will make it), and the vocabularies agree:
    tokenizer <= model.vocab_size, each shard directory's manifest and ids fit model.vocab_size.

    Raises ConfigError naming the field (data.train[i].path, data.val, data.tokenizer, model.vocab_size,
    init_from, ...)."""
    data, model = recipe.data, recipe.model
    prepare = _will_prepare(recipe)
    vocab = model.vocab_size
    if recipe.init_from and not Path(recipe.init_from).exists():
        raise ConfigError("init_from", f"{recipe.init_from}: not found")
    if prepare and not model.is_image and data.prepare.vocab_size > vocab:
        raise ConfigError(
            "data.prepare.vocab_size", f"{data.prepare.vocab_size} tokens do not fit model.vocab_size={vocab}"
        )

    _check_tokenizer(recipe, task_name, prepare)
    if data.source == "shards" and not prepare:
        _check_shards(recipe)


def _check_shards(recipe: RecipeConfig) -> None:
    from llm.data.shards import MANIFEST, ShardError, check_vocab

    data, model = recipe.data, recipe.model
    vocab = model.vocab_size
    fields = [f"data.train[{i}].path" for i in range(len(data.train))] if isinstance(data.train, list) else []
    named = list(zip(fields or ["data.train"], data.train_paths))
    if data.val is not None:
        named.append(("data.val", data.val))
    for field, path in named:
        if not (Path(path) / MANIFEST).is_file():
            what = "no such directory" if not Path(path).exists() else f"no {MANIFEST} in it"
            hint = " and data.prepare is not set" if field == "data.train" else ""
            raise ConfigError(field, f"{path}: {what}{hint} (make shards with `llm data prepare`)")
        if model.is_image:
            continue
        try:
            check_vocab(path, vocab)
        except ShardError as e:
            raise ConfigError(field, str(e)) from None


def _check_tokenizer(recipe: RecipeConfig, task_name: str, prepare: bool) -> None:
    from llm.data.shards import MANIFEST, ShardError, load_manifest

    data, model = recipe.data, recipe.model
    vocab = model.vocab_size
    needs_tokenizer = recipe.logging.sample_prompt is not None and task_name == "causal_lm"
    if data.tokenizer is None:
        if needs_tokenizer and data.source == "shards":
            raise ConfigError("data.tokenizer", "needed to decode logging.sample_prompt's sample (or set it to null)")
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


def check_trackers(recipe: RecipeConfig) -> None:
    """The optional trackers the recipe turns on are installed."""
    import importlib.util

    for field, package in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(recipe.logging, field) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging.{field}", f"true needs the {package} package (pip install 'llm[{package}]')")


# Fields a resumed run must share with its checkpoint: what the weights are (model, task, transforms) and what
# the saved data position counts in (source, training shards, sequence length, seed).
FIXED_ON_RESUME = ("model", "task", "transforms", "data.source", "data.train", "data.seq_len", "seed")


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


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


def check_resume(recipe: RecipeConfig, resume: str) -> Path | None:
    """Compare the recipe with the one saved in the checkpoint it would resume from; a changed field of
    FIXED_ON_RESUME raises a UserError naming it (e.g. `model.n_layers: 6, the checkpoint ... has 4`).
    Returns that checkpoint (None for a fresh start)."""
    step_dir = resume_checkpoint(recipe, resume)
    if step_dir is None or not (step_dir / "recipe.yaml").is_file():
        return step_dir
    saved = yaml.safe_load((step_dir / "recipe.yaml").read_text()) or {}
    now = dataclasses.asdict(recipe)
    for field in FIXED_ON_RESUME:
        head, _, tail = field.partition(".")
        old, new = saved.get(head), now.get(head)
        if tail:
            old, new = (old or {}).get(tail), (new or {}).get(tail)
        old_flat, new_flat = _flatten(old, field), _flatten(new, field)
        for key in sorted(set(old_flat) | set(new_flat)):
            if old_flat.get(key) != new_flat.get(key):
                raise UserError(
                    f"{key}: {new_flat.get(key)!r} now, {old_flat.get(key)!r} in the checkpoint {step_dir} "
                    f"(a resumed run cannot change {', '.join(FIXED_ON_RESUME)}); restore it or start a "
                    "new run_dir"
                )
    return step_dir
