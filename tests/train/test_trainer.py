"""Trainer pieces: weight-decay groups, the LR schedule, the DeepSpeed JSON, activation checkpointing."""

import math

import pytest

from llm.run.recipe import resolve_recipe
from llm.tasks import build_model
from llm.train.engine import deepspeed_config
from llm.train.schedule import ScheduleConfig, lr_factor, param_groups
from tests.train.helpers import TINY, assembled_trainer


def test_no_weight_decay_on_norms_biases_embeddings():
    recipe = resolve_recipe(TINY)
    model = build_model(recipe.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n or "embed" in n for n in decayed)
    total = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert total == sum(p.numel() for p in model.parameters())  # tied weights counted once


def test_warmup_then_cosine_and_linear():
    cos = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos, 110) == pytest.approx(0.1)
    assert lr_factor(9, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_factor(25, lin, 100) == pytest.approx(0.75)


def test_deepspeed_json_from_preset_and_recipe():
    data = {**TINY, "train": {**TINY["train"], "grad_accum": 3, "precision": "bf16"}}
    data["deepspeed"] = {"preset": "zero2", "config": {"zero_optimization": {"reduce_bucket_size": 1000}}}
    recipe = resolve_recipe(data)
    cfg = deepspeed_config(recipe.deepspeed, recipe.train, recipe.optim, world_size=2)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.1


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    runs = []
    for ac in (False, True):
        data = {**TINY, "run_dir": str(tmp_path / str(ac)), "checkpoint": {"save_final": False}}
        data["train"] = {**TINY["train"], "max_steps": 3, "activation_checkpointing": ac}
        trainer = assembled_trainer(resolve_recipe(data))
        runs.append([trainer.train_step()["loss"] for _ in range(3)])
    for a, b in zip(*runs):
        assert abs(a - b) / abs(a) < 1e-6


def test_finetune_starts_from_the_checkpoint_weights(tmp_path):
    """init_from a run's checkpoints/: the new run's model starts with the consolidated trained weights."""
    from llm.run.loader import load_checkpoint_model
    from tests.conftest import rel_err

    data = {**TINY, "run_dir": str(tmp_path / "pre"), "train": {**TINY["train"], "max_steps": 2}}
    data["logging"] = {"tensorboard": False}
    assembled_trainer(resolve_recipe(data)).fit()
    trained = load_checkpoint_model(tmp_path / "pre" / "checkpoints").state_dict()
    data = {**data, "run_dir": str(tmp_path / "ft"), "init_from": str(tmp_path / "pre" / "checkpoints")}
    tuned = assembled_trainer(resolve_recipe(data))
    for name, value in tuned.model.state_dict().items():
        assert rel_err(value, trained[name]) == 0.0, name
