"""Read metric series back from the trackers' local stores, as their own tools would see them.

W&B: an offline run's transaction log (RUN_DIR/wandb/offline-run-*/run-*.wandb) is W&B's
LevelDB-style record log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of records, each a 7-byte header (checksum, little-endian length, type: 1
full, 2 first, 3 middle, 4 last) and its bytes; a whole record is a `wandb_internal_pb2.Record`
protobuf, whose `history` holds one logged step (items of key and JSON value). MLflow: the
run's metric history through `MlflowClient` on the local file store.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def wandb_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            records.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            records.append(pending + body)
            pending = b""
    return records


def wandb_series(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in the single offline W&B run under RUN_DIR/wandb."""
    from wandb.proto import wandb_internal_pb2

    (log,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out = {}
    for raw in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        if key in items:
            out[int(items["_step"])] = items[key]
    return out


def mlflow_series(run_dir: Path, key: str, experiment: str = "llm") -> dict[int, float]:
    """{step: value} of one metric in the single MLflow run of the file store RUN_DIR/mlruns."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(Path(run_dir).resolve() / "mlruns").as_uri())
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
