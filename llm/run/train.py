"""`llm pretrain` / `llm finetune`: a recipe -> built parts -> the loop -> an export.

`assemble(recipe)` is the one place where a recipe becomes parts: the task, the
model (with `init_from` weights and the recipe's transforms), this rank's
batches, the DeepSpeed engine and the callbacks. `train(recipe)` runs them and,
on rank 0, exports the final model from memory to RUN_DIR/export and prints a
sample when the recipe asks for one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from llm import adapt, kernels
from llm.config import ConfigError, RecipeConfig
from llm.errors import UserError
from llm.fileio import write_atomic
from llm.log import logger, setup_logging
from llm.models.base import Model
from llm.models.info import training_flops_per_token
from llm.run import checks, loader
from llm.run.prepare import prepare_if_missing
from llm.tasks import Task, get_task
from llm.train import checkpoint as ckpt
from llm.train.distributed import DistInfo, distributed
from llm.train.engine import build_engine, deepspeed_config
from llm.train.metrics import device_peak_flops
from llm.train.trainer import Trainer, Validation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_recipe(recipe: RecipeConfig, paths: bool = True) -> Task:
    """Everything about the recipe that needs no process group: the task, its fit with the model,
    the transforms' names, the kernels, every path and vocabulary (`llm.run.checks.check_paths`),
    the preset and the batch arithmetic for the launcher's world size. Returns the task.
    `paths=False` leaves out the files (inside a started run, where rank 0 may be preparing them)."""
    task = get_task(recipe.task)
    task.check(recipe.model)
    for i, spec in enumerate(recipe.transforms):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in adapt.TRANSFORMS:
            raise ConfigError(
                f"transforms[{i}].name", f"unknown transform {name!r} (known: {', '.join(adapt.TRANSFORMS)})"
            )
    try:
        kernels.check_names(recipe.kernels)
    except ValueError as e:
        raise ConfigError("kernels", str(e)) from None
    checks.check_trackers(recipe)
    if paths:
        checks.check_paths(recipe, task.name)
    deepspeed_config(recipe, checks.launcher_world_size(), task.min_micro_batch)  # preset, batch arithmetic
    return task


def dry_run(recipe: RecipeConfig, resume: str = "auto") -> str:
    """`--dry-run`: every check of `train`, then the resolved recipe (YAML) and the DeepSpeed JSON for the
    launcher's world size, as text; nothing is started or written."""
    task = check_recipe(recipe)
    step_dir = checks.check_resume(recipe, resume)
    world = checks.launcher_world_size()
    ds_json = deepspeed_config(recipe, world, task.min_micro_batch)
    start = f"resume from {step_dir}" if step_dir else "a fresh start"
    return (
        f"# resolved recipe ({start})\n{yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)}"
        f"# DeepSpeed config ({world} rank{'s' if world != 1 else ''})\n{json.dumps(ds_json, indent=2)}"
    )


def build_model(recipe: RecipeConfig, task: Task) -> Model:
    """The recipe's model with the task's head, `init_from` weights where shapes agree, then its transforms."""
    model = task.build_model(recipe.model)
    if recipe.init_from:
        init = loader.load_model(recipe.init_from)
        own, state = model.state_dict(), init.state_dict()
        for key, tensor in state.items():
            if key in own and own[key].shape != tensor.shape:
                raise ConfigError(
                    "init_from",
                    f"{recipe.init_from}: {key} has shape {tuple(tensor.shape)}, "
                    f"the recipe's model needs {tuple(own[key].shape)}",
                )
        result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if result.missing_keys:
            logger.info(f"init_from {recipe.init_from}: freshly initialised: {', '.join(result.missing_keys)}")
    model = adapt.apply_transforms(model, recipe.transforms)
    if recipe.train.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


@dataclass
class Parts:
    """What `assemble` builds and `train` runs."""

    task: Task
    model: Model
    engine: object
    trainer: Trainer
    validation: Validation


def assemble(recipe: RecipeConfig, dist: DistInfo, resume: str) -> Parts:
    """Build the parts of a run in a started process group; see the module docstring."""
    task = check_recipe(recipe, paths=False)  # train() checked the files before the process group
    ds_json = deepspeed_config(recipe, dist.world_size, task.min_micro_batch)
    seed_everything(recipe.seed)
    prepare_if_missing(recipe, dist.rank)
    per_rank = dict(
        seed=recipe.seed, micro_batch=recipe.train.micro_batch_size, rank=dist.rank, world_size=dist.world_size
    )
    train_batches = task.batches(recipe.model, recipe.data, "train", **per_rank)
    val_batches = task.batches(recipe.model, recipe.data, "val", **per_rank)
    model = build_model(recipe, task).to(dist.device)
    seq = recipe.model.seq_len if recipe.model.is_image else recipe.data.seq_len
    flops_per_token = training_flops_per_token(model, seq)
    engine = build_engine(model, recipe, ds_json)
    if dist.rank == 0:
        run_dir = Path(recipe.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    validation = Validation(val_batches, recipe.train.eval_every, recipe.train.eval_batches)
    peak, _ = device_peak_flops(dist.device, recipe.train.precision)
    trainer = Trainer(recipe, dist, engine, model, task, train_batches, [validation], flops_per_token, peak)
    trainer.resume(resume)
    return Parts(task, model, engine, trainer, validation)


def gathered_copy(model: Model, zero_stage: int) -> Model:
    """A CPU fp32 copy of the trained model, gathered from every rank under ZeRO-3 (all ranks call)."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    copy = loader.build_from_description(model.description(), "the trained model")
    return loader.load_weights(copy, state, "the trained model").eval()


def export(model: Model, recipe: RecipeConfig) -> Path:
    """RUN_DIR/export: the model as an llm model directory, with the run's tokenizer.json."""
    tokenizer = recipe.data.tokenizer if recipe.data.tokenizer and Path(recipe.data.tokenizer).is_file() else None
    return loader.save_pretrained(model, Path(recipe.run_dir) / "export", tokenizer)


def sample(model: Model, recipe: RecipeConfig) -> str:
    """A sample (temperature 0.8, top-k 40) from a causal LM, decoded with the run's tokenizer."""
    from llm.data.tokenizer import Tokenizer
    from llm.models.generation import generate

    tok = Tokenizer(recipe.data.tokenizer)
    ids = tok.tokenizer.encode(recipe.logging.sample_prompt).ids or [tok.eos_id or 0]
    g = torch.Generator().manual_seed(recipe.seed)
    out = generate(
        model, torch.tensor([ids]), max_new_tokens=recipe.logging.sample_tokens, temperature=0.8, top_k=40, generator=g
    )
    return tok.tokenizer.decode(out[0].tolist())


def train(recipe: RecipeConfig, resume: str = "auto") -> dict:
    """Train a recipe to its end; on rank 0 export the final model and print a sample when asked."""
    started = time.perf_counter()
    check_recipe(recipe)  # fail in milliseconds, before any process group
    checks.check_resume(recipe, resume)
    with distributed(recipe.faults.collective_timeout_s) as dist, kernels.use(recipe.kernels):
        setup_logging(dist.rank)
        parts = assemble(recipe, dist, resume)
        summary = parts.trainer.fit()
        summary["val"] = parts.validation.last
        if not summary["preempted"] and recipe.checkpoint.save_final:
            final = gathered_copy(parts.model, parts.engine.zero_optimization_stage())
            if dist.rank == 0:
                summary["export"] = str(export(final, recipe))
                if recipe.logging.sample_prompt is not None and parts.task.name == "causal_lm":
                    summary["sample"] = sample(final, recipe)
                    print(
                        f"--- sample (prompt {recipe.logging.sample_prompt!r}) ---\n{summary['sample']}\n---",
                        flush=True,
                    )
    summary["total_s"] = time.perf_counter() - started
    if dist.rank == 0:
        _report(summary, recipe)
    return summary


def _report(summary: dict, recipe: RecipeConfig) -> None:
    val = summary.get("val") or {}
    ppl = f", val ppl {val['val_ppl']:.2f}" if "val_ppl" in val else ""
    losses = ""
    if summary["first_loss"] is not None:
        losses = f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    preempted = " (preempted)" if summary["preempted"] else ""
    logger.info(f"done: {summary['steps']} steps{losses}{ppl}, {summary['total_s']:.1f} s{preempted}")
    if "export" in summary:
        latest = ckpt.find_checkpoint(Path(recipe.run_dir) / "checkpoints")
        logger.info(f"checkpoint {latest}, model exported to {summary['export']}")


def finetune(recipe: RecipeConfig, resume: str = "auto") -> dict:
    """`train` from pretrained weights: the recipe must name `init_from`."""
    if not recipe.init_from:
        raise UserError(
            "init_from: fine-tuning starts from a model (an llm model, run or checkpoint directory, "
            "or a Hugging Face directory)"
        )
    return train(recipe, resume)
