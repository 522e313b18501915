"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow.

W&B and MLflow are optional extras (`pip install llm[wandb]`, `llm[mlflow]`), imported only when
a recipe turns them on (`logging.wandb`, `logging.mlflow`). Each tracker receives every record
rank 0 writes to metrics.jsonl (numeric fields, at the record's step), so the series agree.

A tracker never ends a run: one that fails to start or to write (a read-only tracking store, a
full disk, a server that went away) is reported once, naming its setting, and switched off;
metrics.jsonl keeps every record and checkpoints are written as ever.

- W&B runs offline by default (`logging.wandb_mode: offline`): the run is a local directory
  RUN_DIR/wandb/offline-run-*, uploaded later with `wandb sync` if wanted; nothing is sent.
- MLflow logs to `logging.mlflow_uri`, by default the local file store RUN_DIR/mlruns (MLflow 3
  keeps it in maintenance mode behind MLFLOW_ALLOW_FILE_STORE=true, which is set for it; read it
  with `mlflow ui --backend-store-uri RUN_DIR/mlruns`, or point mlflow_uri at a server or sqlite).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Literal

from llm.config import positive
from llm.errors import UserError
from llm.log import logger


@dataclasses.dataclass
class LoggingConfig:
    """The `logging:` section. Where metrics go besides RUN_DIR/metrics.jsonl: TensorBoard (on by
    default), and the optional trackers Weights & Biases (`pip install llm[wandb]`) and MLflow
    (`pip install llm[mlflow]`); the progress bar and the sample printed after training."""

    tensorboard: bool = True
    wandb: bool = False  # a W&B run under RUN_DIR/wandb
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: nothing leaves the machine (`wandb sync` later)
    mlflow: bool = False  # an MLflow run in mlflow_uri
    mlflow_uri: str | None = None  # tracking URI; None: the local file store RUN_DIR/mlruns
    experiment: str | None = None  # W&B project / MLflow experiment (None: "llm")
    progress: bool = True  # rank 0 progress bar
    sample_prompt: str | None = None  # after training, print a sample generated from this prompt (causal LM)
    sample_tokens: int = 48

    def validate(self, path: str = "logging") -> None:
        positive(self, path, "sample_tokens")


def _numbers(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }


def _missing(package: str, extra: str, field: str) -> UserError:
    return UserError(f"{field}: true needs the {package} package (pip install 'llm[{extra}]' or pip install {package})")


class TensorBoardTracker:
    """TensorBoard event files in RUN_DIR/tensorboard."""

    name = "logging.tensorboard"

    def __init__(self, logging: LoggingConfig, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, int(record["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run (offline by default) in RUN_DIR/wandb, named after the run directory."""

    name = "logging.wandb"

    def __init__(self, logging: LoggingConfig, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb", "logging.wandb") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logging.experiment or "llm",
            name=run_dir.resolve().name,
            dir=str(run_dir),
            mode=logging.wandb_mode,
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
            reinit="create_new",
        )

    def write(self, record: dict) -> None:
        self.run.log(_numbers(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One MLflow run in `logging.mlflow_uri` (default: the file store RUN_DIR/mlruns), through a client
    object so no process-wide MLflow state is touched."""

    name = "logging.mlflow"

    def __init__(self, logging: LoggingConfig, run_dir: Path, config: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow", "logging.mlflow") from None
        uri = logging.mlflow_uri or (run_dir.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store but asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = logging.experiment or "llm"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name)
        self.run_id = run.info.run_id
        flat = _flatten(config)
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["step"])
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def switched_off(name: str, error: Exception) -> None:
    """Say once that tracker `name` failed and is off from now on."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    logger.warning(f"{name}: switched off after {type(error).__name__}: {reason}; metrics.jsonl keeps every record")


def open_trackers(logging: LoggingConfig, run_dir: Path, config: dict) -> list:
    """The trackers `logging` turns on for the run in `run_dir`, each with `name`, write(record) and
    close(); `config` (the recipe as a mapping) is logged with them. One that cannot start is
    `switched_off`; a missing package is a UserError (`llm.run.checks` finds it before training)."""
    trackers = []
    for field, tracker in TRACKERS.items():
        if not getattr(logging, field):
            continue
        try:
            trackers.append(tracker(logging, run_dir, config))
        except UserError:
            raise
        except Exception as e:  # each tracker's library raises its own types (OSError, MlflowException, CommError)
            switched_off(tracker.name, e)
    return trackers
