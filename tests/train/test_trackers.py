"""Weights & Biases (offline) and MLflow (local file store) receive the same series as metrics.jsonl."""

import json
import logging

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


def test_a_tracker_that_cannot_write_is_switched_off_and_the_run_goes_on(tmp_path):
    """MLflow's store and TensorBoard's folder unwritable (a regular file where a folder must be): each
    is reported once and off; metrics.jsonl keeps every step and the checkpoint is written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("not a folder")
    (tmp_path / "store").write_text("not a folder")
    recipe = dict(TINY, run_dir=str(run_dir), data={"source": "synthetic", "seq_len": 16, "val": None})
    recipe["train"] = dict(TINY["train"], max_steps=3)
    recipe["logging"] = {"tensorboard": True, "mlflow": True, "mlflow_uri": (tmp_path / "store" / "mlruns").as_uri()}
    stderr = run(write_recipe(tmp_path / "r.yaml", recipe), 1)
    assert "Traceback" not in stderr
    for name in ("logging.tensorboard", "logging.mlflow"):
        (line,) = [line for line in stderr.splitlines() if line.startswith(f"llm: warning: {name}: switched off")]
        assert "metrics.jsonl keeps every record" in line
    assert sorted(jsonl_series(run_dir, "loss")) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"


class Flaky:
    """A tracker whose second write fails, as a store that fills up or goes read-only would."""

    name = "logging.flaky"

    def __init__(self):
        self.steps, self.closed = [], False

    def write(self, record):
        if self.steps:
            raise OSError(30, "Read-only file system")
        self.steps.append(record["step"])

    def close(self):
        self.closed = True


def test_a_tracker_failing_mid_run_is_reported_once_and_metrics_jsonl_keeps_everything(tmp_path, caplog):
    from llm.train.metrics import MetricsWriter

    caplog.set_level(logging.WARNING, logger="llm")
    flaky, steady = Flaky(), Flaky()
    steady.write = lambda record: steady.steps.append(record["step"])
    writer = MetricsWriter(tmp_path, [flaky, steady])
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": 1.0 / step})
    writer.close()
    assert sorted(jsonl_series(tmp_path, "loss")) == [1, 2, 3, 4]
    assert flaky.steps == [1] and not flaky.closed and steady.steps == [1, 2, 3, 4] and steady.closed
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        "logging.flaky: switched off after OSError: [Errno 30] Read-only file system; metrics.jsonl keeps every record"
    )
