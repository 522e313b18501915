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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from llm import kernels, transforms
from llm.compress.distill import Distiller
from llm.compress.prune import GradualPruner
from llm.config import ConfigError
from llm.errors import UserError
from llm.fileio import write_atomic
from llm.log import logger, setup_logging
from llm.models.base import Model
from llm.models.info import training_flops_per_token
from llm.run import checks, init_from, loader
from llm.run.export import export_artifacts
from llm.run.prepare import prepare_if_missing
from llm.run.recipe import RecipeConfig, load_finetune_recipe, load_recipe
from llm.tasks import OPTIONS, Task, get_task
from llm.train import checkpoint as ckpt
from llm.train import parallel, tensor_parallel
from llm.train.distributed import DistInfo, distributed, owns_run_dir, refuse_taken_run_dir
from llm.train.engine import build_engine, deepspeed_config
from llm.train.metrics import device_peak_flops
from llm.train.trainer import Callback, Trainer, Validation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_recipe(recipe: RecipeConfig, paths: bool = True) -> Task:
    """The checks that need no process group but more than the recipe's own fields (loading it
    checked those): every path and vocabulary (`llm.run.checks.check_paths`: data, tokenizer,
    init_from, distill.teacher), the label map the run decides (`llm.run.checks.run_task`), the task's fit
    with the model, the trackers, the preset and the batch arithmetic for the launcher's world
    size, pruning's engine needs. Returns the task. `paths=False` leaves out the files (inside a
    started run, where rank 0 may be preparing them)."""
    if paths:
        checks.check_paths(recipe, get_task(recipe.task))
    task = checks.run_task(recipe)
    task.check(recipe.model)
    checks.check_document_mask(recipe, task)
    checks.check_parallel(recipe, task, checks.launcher_world_size())
    checks.check_trackers(recipe)
    ds_json = ds_config(recipe, checks.launcher_world_size(), task)  # preset, batch
    if recipe.prune.sparsity:
        stage = ds_json.get("zero_optimization", {}).get("stage", 0)
        if stage != 0 or recipe.train.precision != "fp32":
            raise ConfigError(
                "prune",
                f"gradual pruning masks the model's own weights, which needs ZeRO stage 0 and fp32 "
                f"(this recipe: stage {stage}, {recipe.train.precision})",
            )
    return task


def ds_config(recipe: RecipeConfig, world_size: int, task: Task) -> dict:
    """The run's DeepSpeed JSON for `world_size` ranks (see `llm.train.engine.deepspeed_config`)."""
    p = recipe.parallel
    return deepspeed_config(
        recipe.deepspeed, recipe.train, recipe.optim, world_size, task.min_micro_batch, p.sequence, p.tensor
    )


def dry_run_report(recipe: RecipeConfig, resume: str = "auto", overwrite: bool = False) -> str:
    """`--dry-run`: every check of `train`, then the resolved recipe (YAML) and the DeepSpeed JSON for the
    launcher's world size, as text; nothing is started or written."""
    task = check_recipe(recipe)
    step_dir = checks.check_resume(recipe, resume, task)
    check_run_dir(recipe, resume, overwrite)
    world = checks.launcher_world_size()
    ds_json = ds_config(recipe, world, task)
    start = f"resume from {step_dir}" if step_dir else "a fresh start"
    return (
        f"# resolved recipe ({start})\n{yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)}"
        f"# DeepSpeed config ({world} rank{'s' if world != 1 else ''})\n{json.dumps(ds_json, indent=2)}"
    )


def load_teacher(recipe: RecipeConfig) -> Model:
    """The `distill.teacher` model, checked (`checks.check_teacher`) to share the student's vocabulary
    and tokenizer."""
    checks.check_teacher(recipe)
    return loader.load_model(recipe.distill.teacher).eval()


def build_model(recipe: RecipeConfig, task: Task) -> Model:
    """The recipe's model with the task's head, then its transforms; from `init_from`, with the
    weights and whatever the earlier run trained carried over (`llm.run.init_from`)."""
    model = task.build_model(recipe.model)
    steps = recipe.transform_settings()
    if recipe.init_from:
        model = init_from.build(model, recipe.init_from, steps)
    else:
        for path, settings in steps:
            model = transforms.apply_transform(model, settings, path)
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


RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "heartbeat")


def earlier_run(run_dir: Path) -> str | None:
    """What of an earlier run `run_dir` holds (its newest checkpoint, export or metrics), else None."""
    run_dir = Path(run_dir)
    steps = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    if steps:
        return f"the checkpoints of an earlier run ({', '.join(s.name for s in steps[-2:])})"
    for name in ("export", "metrics.jsonl"):
        if (run_dir / name).exists():
            return f"an earlier run's {name}"
    return None


def check_run_dir(recipe: RecipeConfig, resume: str, overwrite: bool) -> None:
    """A run directory has one owner: a fresh run (`resume="none"`) into one that holds an earlier
    run's outputs is refused unless `overwrite` (which deletes them before training)."""
    if resume != "none" or overwrite:
        return
    found = earlier_run(Path(recipe.run_dir))
    if found:
        raise UserError(
            f"run_dir {recipe.run_dir}: holds {found}; continue it with --resume auto, "
            f"or start over with --overwrite (deletes that run's checkpoints, export and metrics)"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Delete an earlier run's outputs (rank 0, for --overwrite)."""
    import shutil

    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def assemble(
    recipe: RecipeConfig, dist: DistInfo, resume: str, overwrite: bool = False, callbacks: Sequence[Callback] = ()
) -> Parts:
    """Build the parts of a run in a started process group; see the module docstring. `callbacks`: the
    caller's own, run after the recipe's (validation, gradual pruning) and resumed with them."""
    task = check_recipe(recipe, paths=False)  # train() checked the files before the process group
    recipe.task = OPTIONS.build(task.to_dict(), "task")  # the label map the data decided is part of the record
    check_run_dir(recipe, resume, overwrite)
    if overwrite:
        import torch.distributed as tdist

        if dist.rank == 0:
            logger.info(f"--overwrite: deleting the earlier run's outputs in {recipe.run_dir}")
            clear_run_dir(Path(recipe.run_dir))
        tdist.barrier()
    ds_json = ds_config(recipe, dist.world_size, task)
    seed_everything(recipe.seed)
    prepare_if_missing(recipe, dist.rank)
    # world = data x sequence x tensor: a sequence and a tensor group read their data-parallel rank's samples,
    # each rank of a sequence group a slice of them
    mesh = parallel.Mesh.of(recipe.parallel, dist.world_size)
    device_mesh = parallel.device_mesh(mesh, dist.device)
    sequence = parallel.sequence_parallel(device_mesh)
    tensor = tensor_parallel.tensor_parallel(device_mesh, mesh)
    per_rank = dict(
        seed=recipe.seed,
        micro_batch_size=recipe.train.micro_batch_size,
        rank=mesh.coordinates(dist.rank)[0],
        world_size=mesh.data,
    )
    train_batches = task.batches(recipe.model, recipe.data, "train", **per_rank)
    val_batches = task.batches(recipe.model, recipe.data, "val", **per_rank)
    model = build_model(recipe, task).to(dist.device)
    if sequence is not None:
        train_batches = parallel.SequenceSlices(train_batches, sequence.rank, sequence.size)
        if val_batches is not None:
            val_batches = parallel.SequenceSlices(val_batches, sequence.rank, sequence.size)
        model.transformer.set_sequence_parallel(sequence)
    seq = recipe.model.seq_len if recipe.model.is_image else recipe.data.seq_len
    flops_per_token = training_flops_per_token(model, seq)
    pruning = []
    if recipe.prune.sparsity:
        pruning.append(GradualPruner(model, recipe.prune))
    if recipe.distill.teacher:
        d = recipe.distill
        teacher = load_teacher(recipe).to(dist.device)
        model = Distiller(model, teacher, d.teacher, d.temperature, d.alpha, d.hidden_mse).to(dist.device)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    logger.info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.4f}%)")
    if tensor is not None:  # after the whole model's FLOPs and parameters are counted
        model.transformer.set_tensor_parallel(tensor)
    engine = build_engine(model, ds_json, recipe.optim, recipe.schedule, recipe.train, mpu=tensor)
    validation = Validation(val_batches, recipe.train.eval_every, recipe.train.eval_batches)
    peak, _ = device_peak_flops(dist.device, recipe.train.precision)
    all_callbacks = [validation, *pruning, *callbacks]
    trainer = Trainer(
        recipe, dist, engine, model, task, train_batches, all_callbacks, flops_per_token, peak, sequence, tensor
    )
    trainer.resume(resume)  # first: a recipe the checkpoint refuses must not be recorded as the run's
    if dist.rank == 0:
        run_dir = Path(recipe.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
        keep_tokenizer(recipe)
    return Parts(task, model, engine, trainer, validation)


def gathered_copy(model: Model, zero_stage: int, tensor: tensor_parallel.TensorParallel | None = None) -> Model:
    """A CPU fp32 copy of the whole trained model, gathered from every rank under ZeRO-3 or tensor
    parallelism (`tensor`: this rank's group; all ranks call)."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        state = model.state_dict() if tensor is None else tensor.whole_state_dict(model)
        state = {k: v.detach().float().cpu().clone() for k, v in state.items()}
    copy = loader.build_from_description(model.description(), "the trained model")
    return loader.load_weights(copy, state, "the trained model").eval()


def export(model: Model, recipe: RecipeConfig) -> Path:
    """RUN_DIR/export with the run's tokenizer.json (see `llm.run.export.export_artifacts`): a Hugging
    Face directory of the merged model, plus adapter/ for LoRA (PEFT's layout) or prefix and prompt
    tuning (llm's), where Hugging Face can hold the model; else an llm model directory."""
    tokenizer = recipe.data.tokenizer if recipe.data.tokenizer and Path(recipe.data.tokenizer).is_file() else None
    return Path(export_artifacts(model, Path(recipe.run_dir) / "export", tokenizer, recipe.init_from)["export"])


def keep_tokenizer(recipe: RecipeConfig) -> None:
    """Copy the run's tokenizer.json into RUN_DIR, so its checkpoints decode on their own."""
    source = recipe.data.tokenizer
    if source and Path(source).is_file():
        target = Path(recipe.run_dir) / loader.TOKENIZER
        if not target.exists() or target.resolve() != Path(source).resolve():
            write_atomic(target, Path(source).read_bytes())


def sample(model: Model, recipe: RecipeConfig) -> str:
    """A sample (temperature 0.8, top-k 40) from a causal LM, decoded with the run's tokenizer."""
    from llm.data.tokenizer import Tokenizer
    from llm.models.generation import generate

    tok = Tokenizer(recipe.data.tokenizer)
    ids = tok.encode(recipe.logging.sample_prompt, ordinary=False) or [tok.eos_id or 0]
    g = torch.Generator().manual_seed(recipe.seed)
    out = generate(
        model, torch.tensor([ids]), max_new_tokens=recipe.logging.sample_tokens, temperature=0.8, top_k=40, generator=g
    )
    return tok.tokenizer.decode(out[0].tolist())


def train(recipe: RecipeConfig, resume: str = "auto", overwrite: bool = False) -> dict:
    """Train a recipe to its end; on rank 0 export the final model and print a sample when asked.
    `overwrite`: start afresh in a run directory that holds an earlier run (see `check_run_dir`)."""
    started = time.perf_counter()
    task = check_recipe(recipe)  # fail in milliseconds, before any process group
    checks.check_resume(recipe, resume, task)
    check_run_dir(recipe, resume, overwrite)
    refuse_taken_run_dir(recipe.run_dir)
    with (
        distributed(recipe.faults.collective_timeout_s) as dist,
        owns_run_dir(recipe.run_dir, dist),
        kernels.use(recipe.kernels),
    ):
        setup_logging(dist.rank)
        parts = assemble(recipe, dist, resume, overwrite)
        summary = parts.trainer.fit()
        summary["val"] = parts.validation.last
        if not summary["preempted"] and recipe.checkpoint.save_final:
            trained = parts.model.student if isinstance(parts.model, Distiller) else parts.model
            final = gathered_copy(trained, parts.engine.zero_optimization_stage(), parts.trainer.tensor)
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


def require_teacher(recipe: RecipeConfig) -> None:
    """Distillation needs `distill.teacher`; a UserError otherwise."""
    if not recipe.distill.teacher:
        raise UserError("distill.teacher: distillation needs a teacher model (any model, run or checkpoint path)")


def _start(recipe: RecipeConfig, dry_run: bool, resume: str, overwrite: bool) -> dict | None:
    """`train` the recipe; with `dry_run` print its `dry_run_report` instead."""
    if dry_run:
        print(dry_run_report(recipe, resume=resume, overwrite=overwrite), end="")
        return None
    return train(recipe, resume, overwrite)


def pretrain(
    recipe: str,
    *,
    set: list[str] | None = None,
    dry_run: bool = False,
    resume: str = "auto",
    overwrite: bool = False,
) -> dict | None:
    """Pretrain a model from a recipe on DeepSpeed.

    Args:
        recipe: a recipe YAML (configs/recipes/*.yaml)
        set: override recipe fields, KEY=VALUE (several pairs per flag, and the flag repeated:
            --set a.b=1 c.d=2)
        dry_run: run every check, print the resolved recipe and the DeepSpeed JSON, and exit
        resume: auto (the run's latest complete checkpoint, if any), none, or a checkpoint path
        overwrite: start afresh in a run directory that holds an earlier run (deletes its checkpoints,
            export, metrics)

    Example:
        llm pretrain configs/recipes/quickstart.yaml
        llm pretrain configs/recipes/gpt.yaml --set deepspeed.zero_stage=3 --set train.max_steps=1000
        torchrun --nproc_per_node 2 -m llm pretrain configs/recipes/gpt.yaml
    """
    return _start(load_recipe(recipe, set), dry_run, resume, overwrite)


def finetune(
    recipe: str,
    *,
    init_from: str | None = None,
    set: list[str] | None = None,
    dry_run: bool = False,
    resume: str = "auto",
    overwrite: bool = False,
) -> dict | None:
    """Fine-tune a pretrained model (a model directory or checkpoint) with a recipe.

    Fine-tune the model at init_from (an llm model, run or checkpoint directory, or a Hugging Face
    directory): its shape comes from there, the task's new head is freshly initialised, and adapt:
    {method: full|lora|prefix|prompt|freeze} picks what trains. Same engine, checkpoints and resume as
    llm pretrain. See docs/finetuning.md.

    Args:
        recipe: a recipe YAML (configs/finetune/*.yaml)
        init_from: model, run or checkpoint directory (default: the recipe's init_from)
        set: override recipe fields, KEY=VALUE (several pairs per flag, and the flag repeated:
            --set a.b=1 c.d=2)
        dry_run: run every check, print the resolved recipe and the DeepSpeed JSON, and exit
        resume: auto (the run's latest complete checkpoint, if any), none, or a checkpoint path
        overwrite: start afresh in a run directory that holds an earlier run (deletes its checkpoints,
            export, metrics)

    Example:
        llm pretrain configs/recipes/quickstart.yaml                  # a small GPT in runs/quickstart/export
        llm data examples stdlib-instructions --out data/instructions  # prompt/response pairs from the stdlib
        llm finetune configs/finetune/instruct.yaml --set train.max_steps=50
    """
    overrides = list(set or []) + ([f"init_from={init_from}"] if init_from else [])
    return _start(load_finetune_recipe(recipe, overrides), dry_run, resume, overwrite)


def distill(
    recipe: str,
    *,
    set: list[str] | None = None,
    dry_run: bool = False,
    resume: str = "auto",
    overwrite: bool = False,
) -> dict | None:
    """Train a student from a teacher (KL on softened logits + hard labels); the recipe has a distill: section.

    The recipe's distill.teacher names the teacher (any model, run or checkpoint path); see
    llm.compress.distill for the objective.

    Args:
        recipe: a recipe YAML with a distill: section (configs/compress/*.yaml)
        set: override recipe fields, KEY=VALUE (several pairs per flag, and the flag repeated:
            --set a.b=1 c.d=2)
        dry_run: run every check, print the resolved recipe and the DeepSpeed JSON, and exit
        resume: auto (the run's latest complete checkpoint, if any), none, or a checkpoint path
        overwrite: start afresh in a run directory that holds an earlier run (deletes its checkpoints,
            export, metrics)

    Example:
        llm distill configs/compress/distill_quickstart.yaml
    """
    loaded = load_recipe(recipe, set)
    require_teacher(loaded)
    return _start(loaded, dry_run, resume, overwrite)
