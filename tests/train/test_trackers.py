"""Weights & Biases (offline) and MLflow (local file store) receive the same series as metrics.jsonl."""

import json

import pytest

from tests.train.helpers import TINY, run, write_recipe
from tests.train.tracker_stores import mlflow_series, wandb_series


def jsonl_series(run_dir, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_tracker_run_read_back_from_its_local_store_equals_metrics_jsonl(tmp_path, tracker, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: the recipe's wandb_mode is offline too
    run_dir = tmp_path / "run"
    recipe = dict(TINY, run_dir=str(run_dir), data={"source": "synthetic", "seq_len": 16, "val": None})
    recipe["train"] = dict(TINY["train"], max_steps=6, log_every=2, eval_every=3)
    recipe["logging"] = {"tensorboard": False, tracker: True}
    run(write_recipe(tmp_path / "r.yaml", recipe), 1)
    read = wandb_series if tracker == "wandb" else mlflow_series
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        expected = jsonl_series(run_dir, key)
        assert sorted(expected) == [1, 2, 4, 6]
        assert read(run_dir, key) == pytest.approx(expected, rel=1e-12, abs=0), key


def test_a_tracker_that_is_not_installed_fails_before_training(tmp_path, monkeypatch):
    from llm.config import ConfigError
    from llm.run import checks
    from llm.run.recipe import resolve_recipe

    recipe = resolve_recipe(dict(TINY, logging={"mlflow": True}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="logging.mlflow: true needs the mlflow package"):
        checks.check_trackers(recipe)
