"""The DeepSpeed side of a run: the recipe's DeepSpeed JSON, and the engine around a built model.

The JSON is a packaged preset (llm/presets/deepspeed/, or a file) with the
recipe's batch arithmetic, precision, clipping, ZeRO stage and optimizer on top,
then `deepspeed.config` merged key by key. Every field is checked here, before
any engine exists.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import torch

from llm.config import ConfigError, check, find_preset, join
from llm.train.config import TrainConfig
from llm.train.schedule import OptimConfig, ScheduleConfig, lr_scheduler, optimizer_json, param_groups


@dataclasses.dataclass
class DeepSpeedConfig:
    """The `deepspeed:` section: a packaged preset (llm/presets/deepspeed/: zero0-zero3) or a JSON
    file, with the recipe's choices on top; `config` is merged last, key by key, into the JSON."""

    preset: str = "zero1"
    zero_stage: int | None = None  # None: the preset's stage
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, path: str = "deepspeed") -> None:
        if self.zero_stage is not None:
            check(self.zero_stage in (0, 1, 2, 3), join(path, "zero_stage"), f"must be 0-3, got {self.zero_stage}")


def check_batch(t: TrainConfig, data_ranks: int, min_micro_batch: int = 1) -> int:
    """global batch = micro_batch_size x grad_accum x data-parallel ranks; returns it.

    Raises ConfigError when train.global_batch_size disagrees, or the micro-batch is below
    what the task needs (`min_micro_batch`, e.g. 2 pairs for in-batch negatives)."""
    product = t.micro_batch_size * t.grad_accum * data_ranks
    if t.global_batch_size is not None and t.global_batch_size != product:
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} != micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} "
            f"x {data_ranks} data-parallel ranks = {product}",
        )
    if t.micro_batch_size < min_micro_batch:
        raise ConfigError(
            "train.micro_batch_size", f"this task needs >= {min_micro_batch} per micro-batch, got {t.micro_batch_size}"
        )
    return product


def load_preset(name: str) -> dict:
    """A DeepSpeed JSON preset by name (zero0-zero3, shipped in the package) or path."""
    path = find_preset("deepspeed", name, "deepspeed.preset")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigError("deepspeed.preset", f"{path}: duplicate key {key!r} in one object")
        return dict(pairs)

    try:
        return json.loads(path.read_text(), object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed.preset", f"{path}: not valid JSON ({e})") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(
    ds: DeepSpeedConfig,
    t: TrainConfig,
    optim: OptimConfig,
    world_size: int,
    min_micro_batch: int = 1,
    sequence_parallel: int = 1,
    tensor_parallel: int = 1,
) -> dict:
    """The preset, then the recipe's batch, precision, clipping, ZeRO and optimizer, then deepspeed.config.

    The world_size / (sequence_parallel x tensor_parallel) data-parallel ranks set the global batch
    (samples). DeepSpeed sees the ranks of a sequence group as data parallel (llm.train.parallel) and
    counts a micro-batch per rank, so its train_batch_size is sequence_parallel times that; a tensor group
    is one data-parallel rank to it (llm.train.tensor_parallel). ZeRO-3 with tensor_parallel > 1 is a
    ConfigError: llm's tensor parallelism runs with ZeRO 0-2."""
    cfg = load_preset(ds.preset)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    stage = zero.get("stage", 0)
    if ds.offload_optimizer:
        if stage < 1:
            raise ConfigError("deepspeed.offload_optimizer", f"needs ZeRO stage >= 1, got stage {stage}")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        if stage != 3:
            raise ConfigError("deepspeed.offload_params", f"needs ZeRO stage 3, got stage {stage}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=check_batch(t, world_size // (sequence_parallel * tensor_parallel), min_micro_batch)
        * sequence_parallel,
        gradient_clipping=t.grad_clip,
        optimizer=optimizer_json(optim, offload=ds.offload_optimizer),
    )
    cfg["bf16"] = {"enabled": t.precision == "bf16"}
    cfg["fp16"] = {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 100}
    cfg = _merge(cfg, ds.config)
    stage = cfg["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.config.zero_optimization.stage", f"must be 0-3, got {stage}")
    if stage == 3 and tensor_parallel > 1:
        raise ConfigError(
            "deepspeed.zero_stage",
            f"3 with parallel.tensor={tensor_parallel}: ZeRO-3 would cut the tensor-parallel shards again; use "
            "ZeRO 0-2 (they shard the optimizer state and gradients over the data-parallel ranks)",
        )
    return cfg


def build_engine(
    model: torch.nn.Module, ds_config: dict, optim: OptimConfig, schedule: ScheduleConfig, t: TrainConfig, mpu=None
):
    """The DeepSpeed engine training `model` with AdamW over its trainable parameters and the
    recipe's lr schedule; `mpu`: the model-parallel groups (a `llm.train.tensor_parallel.TensorParallel`)
    under tensor parallelism. With train.compile the engine compiles the module it wraps
    (`DeepSpeedEngine.compile`: torch.compile with the accelerator's backend, inductor on CPU
    and CUDA), after ZeRO has set up its hooks and partitions, so parameter names, checkpoints and
    exports are those of the eager model; the first steps pay the compilation."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay),
        config=ds_config,
        lr_scheduler=lr_scheduler(schedule, t.max_steps),
        mpu=mpu,
    )
    if t.compile:
        engine.compile()
    return engine
