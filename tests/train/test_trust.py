"""Checkpoints and run directories that can be trusted: no code runs from a checkpoint file, a run
directory has one owner, a damaged newest checkpoint falls back to the intact one, a full disk is one
clear line that leaves nothing partial, and a changed recipe on resume either takes effect or is refused."""

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch
import yaml

from llm.config import ConfigError, build_config
from llm.errors import UserError
from llm.fileio import held, holder_of
from llm.run.loader import load_model
from llm.run.recipe import RecipeConfig
from llm.run.train import train
from llm.train import checkpoint as ckpt
from llm.train.distributed import JOB_LOCK
from llm.train.metrics import MetricsWriter
from llm.train.safe_load import CheckpointError
from llm.train.schedule import lr_factor
from tests.train.helpers import (
    PYTHON,
    ROOT,
    TINY,
    assembled_trainer,
    command,
    descendants,
    env,
    losses,
    write_recipe,
)

pytestmark = pytest.mark.distributed


def recipe_for(run_dir, **train_fields) -> RecipeConfig:
    data = json.loads(json.dumps(TINY))
    data["train"].update({"micro_batch_size": 2, "max_steps": 2, **train_fields})
    data["deepspeed"] = {"zero_stage": 2}
    data["checkpoint"] = {"every_steps": 1, "keep_last": 5}
    data["logging"]["progress"] = False
    data["run_dir"] = str(run_dir)
    from llm.run.recipe import resolve_recipe

    return resolve_recipe(data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step ZeRO-2 run with checkpoints at steps 1 and 2 (copied per test)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(recipe_for(run_dir), resume="none")
    return run_dir


@pytest.fixture
def log(caplog):
    """The `llm` logger's records (tests/conftest.py lets them reach caplog)."""
    caplog.set_level(logging.INFO, logger="llm")
    return caplog


@pytest.fixture
def run_dir(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


class Evil:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(step_dir, name, marker, legacy: bool) -> None:
    """Replace one file of a checkpoint with a crafted pickle and re-sign the manifest (as an attacker can)."""
    path = step_dir / name
    if legacy:
        path.write_bytes(pickle.dumps({"module": Evil(marker)}))
    else:
        torch.save({"module": Evil(marker), "rng": Evil(marker)}, path)
    ckpt.write_manifest(step_dir, ckpt.step_number(step_dir))


# -- case 1: no code from checkpoints ----------------------------------------------------------------

FILES = ["trainer_rank_0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("name", FILES)
def test_a_crafted_checkpoint_file_runs_no_code(run_dir, tmp_path, name, legacy):
    marker = tmp_path / "pwned"
    step = run_dir / "checkpoints" / ckpt.step_tag(2)
    plant(step, name, marker, legacy)
    readers = {"resume": lambda: assembled_trainer(recipe_for(run_dir, max_steps=3), resume="auto")}
    if name != "trainer_rank_0.pt":  # llm eval / convert / init_from read the weights only
        readers["load_model"] = lambda: load_model(run_dir)
        readers["init_from"] = lambda: assembled_trainer(
            dataclasses.replace(recipe_for(tmp_path / "new"), init_from=str(run_dir / "checkpoints")), resume="none"
        )
    for what, read in readers.items():
        with pytest.raises(CheckpointError, match=f"{name}: refused to load"):
            read()
        assert not marker.exists(), f"{what} ran code from {name}"


def test_llm_convert_of_a_crafted_checkpoint_is_one_line_and_runs_nothing(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / ckpt.step_tag(2), "mp_rank_00_model_states.pt", marker, legacy=False)
    proc = subprocess.run(
        [PYTHON, "-m", "llm", "convert", str(run_dir), str(tmp_path / "out")],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and not marker.exists()
    assert "Traceback" not in proc.stderr
    assert "mp_rank_00_model_states.pt: refused to load" in proc.stderr.strip().splitlines()[-1]


# -- case 2: one owner per run directory -----------------------------------------------------------


def test_a_fresh_run_into_a_finished_run_is_refused_unless_overwrite(run_dir):
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"holds the checkpoints of an earlier run .* --resume auto.* --overwrite"):
        train(recipe_for(run_dir, max_steps=1), resume="none")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing touched

    old_export = (run_dir / "export" / "model.safetensors").read_bytes()
    summary = train(recipe_for(run_dir, max_steps=1), resume="none", overwrite=True)
    steps = [p.name for p in (run_dir / "checkpoints").glob("step_*")]
    assert steps == [ckpt.step_tag(1)]  # only this run's
    assert (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip() == ckpt.step_tag(1)
    assert (run_dir / "export" / "model.safetensors").read_bytes() != old_export
    assert sorted(losses(run_dir)) == [1] and summary["steps"] == 1


def test_resuming_an_earlier_step_never_keeps_a_later_one_or_a_dangling_latest(run_dir):
    step1 = run_dir / "checkpoints" / ckpt.step_tag(1)
    trainer = assembled_trainer(recipe_for(run_dir, max_steps=2), resume=str(step1))
    assert trainer.step == 1
    trainer.train_step()
    saved = trainer.save()
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == [ckpt.step_tag(1), ckpt.step_tag(2)] and saved == run_dir / "checkpoints" / ckpt.step_tag(2)
    latest = (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip()
    assert (run_dir / "checkpoints" / latest / ckpt.COMPLETE).is_file()
    ckpt.verify(saved)  # the new step 2, not the old run's


def test_a_second_job_in_a_running_run_dir_is_refused_naming_the_first(tmp_path):
    """Job A (2 ranks, both writing) trains; job B with the same run_dir is one line naming A's rank 0
    (pid, host) and touches nothing; once A is killed, nothing it held is left to refuse the next."""
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "train.micro_batch_size=2"]
    with open(tmp_path / "a.log", "w") as log:
        a = subprocess.Popen(
            command(recipe, 2, *sets, "train.max_steps=100000", resume="none"),
            cwd=ROOT,
            env=env(),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600  # a first start builds DeepSpeed's CPU ops: a kill then would strand their lock
        while not (run_dir / "metrics.jsonl").is_file() or not losses(run_dir):
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.2)
        rank0 = next(p for p in descendants(a.pid) if "\0RANK=0\0" in f"\0{open(f'/proc/{p}/environ').read()}")
        b = subprocess.run(command(recipe, 1, *sets), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert a.poll() is None  # A trains on
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == len(set(steps))  # B wrote no step of its own
    finally:
        for p in [a.pid, *descendants(a.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        a.wait()
    assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr[-3000:]
    errors = [line for line in b.stderr.splitlines() if line.startswith("llm: error:")]
    assert len(errors) == 1 and f"run_dir {run_dir}: another job runs in it" in errors[0]
    assert f"(pid {rank0} on {socket.gethostname()} since " in errors[0], errors[0]

    deadline = time.time() + 60  # SIGKILL is delivered, not awaited: the lock goes with the last thread
    while holder_of(run_dir / JOB_LOCK) is not None:
        assert time.time() < deadline, "a killed job left its run directory locked"
        time.sleep(0.05)
    with held(run_dir / JOB_LOCK, "the next job"):  # the kill took A's lock with it
        pass


# -- case 5: a damaged newest checkpoint ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_rank_0.pt", "model.yaml"],
)
def test_a_truncated_newest_checkpoint_falls_back_to_the_intact_one(run_dir, name, log):
    newest = run_dir / "checkpoints" / ckpt.step_tag(2)
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2])
    trainer = assembled_trainer(recipe_for(run_dir, max_steps=3), resume="auto")
    assert trainer.step == 1
    assert f"{newest / name}: " in log.text and "truncated" in log.text
    model = load_model(run_dir)  # llm eval / convert fall back the same way
    assert model.num_parameters() > 0
    with pytest.raises(CheckpointError, match=f"{name}: .* bytes, the checkpoint's manifest says"):
        load_model(newest)  # a step named explicitly is not replaced by another


def test_a_checkpoint_without_a_manifest_still_names_a_damaged_file(run_dir):
    newest = run_dir / "checkpoints" / ckpt.step_tag(2)
    (newest / ckpt.COMPLETE).write_text("2\n")  # an older llm's marker: nothing to verify against
    model_states = newest / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: not a readable checkpoint file"):
        load_model(newest)


# -- case 6: a full disk ---------------------------------------------------------------------------


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing_partial(tmp_path):
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)  # JIT-built here, if at all: a build under the limit would fail
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "train.max_steps=3", "train.micro_batch_size=2", "checkpoint.every_steps=1"]
    proc = subprocess.run(
        [PYTHON, "-m", "llm", "pretrain", str(recipe), *[x for s in sets for x in ("--set", s)], "--resume", "none"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=limit_file_size(100_000),  # metrics and YAML fit; the model states (~0.4 MB) do not
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("llm: error: checkpoint step_00000001 not saved: "), last
    assert "_model_states.pt: the write stopped part-way: full disk, quota or file-size limit" in last
    assert "nothing of it was kept, the latest checkpoint is still none" in last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.suffix == ".py") == []
    assert sorted(losses(run_dir)) == [1]


def test_a_metrics_line_is_appended_whole_or_not_at_all(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "loss": 1.0})
    size = (tmp_path / "metrics.jsonl").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))  # room for 10 bytes of the next line
        writer.write({"step": 2, "loss": 2.0, "note": "x" * 100})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    writer.write({"step": 3, "loss": 3.0})
    writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 3]

    with open(tmp_path / "metrics.jsonl", "a") as f:  # a crash mid-line
        f.write('{"step": 4, "lo')
    MetricsWriter(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"loss": 3.0}\n')


# -- case 7: a changed recipe on resume ------------------------------------------------------------


def test_a_new_lr_on_resume_takes_effect_and_is_logged(run_dir, log):
    recipe = recipe_for(run_dir, max_steps=4)
    recipe = dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=5e-3))
    trainer = assembled_trainer(recipe, resume="auto")
    assert trainer.step == 2
    assert "optim.lr changed from 0.003 to 0.005" in log.text
    assert "train.max_steps changed from 2 to 4" in log.text
    # step 3 runs at the new peak lr on the new (4-step) schedule; metrics give the lr set for the next step
    assert trainer.engine.get_lr()[0] == pytest.approx(5e-3 * lr_factor(2, recipe.schedule, 4), rel=1e-9)
    metrics = trainer.train_step()
    assert metrics["lr"] == pytest.approx(5e-3 * lr_factor(3, recipe.schedule, 4), rel=1e-9)


@pytest.mark.parametrize(
    "field, value",
    [("model.d_model", 32), ("data.seq_len", 8), ("seed", 7), ("optim.weight_decay", 0.0), ("train.precision", "bf16")],
)
def test_a_change_that_would_make_another_run_is_refused_naming_the_field(run_dir, field, value):
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    data["run_dir"] = str(run_dir)
    section, _, key = field.rpartition(".")
    (data[section] if section else data)[key] = value
    if field == "model.d_model":
        data["model"]["n_heads"] = 2
    recipe = build_config(RecipeConfig, data)
    with pytest.raises(ConfigError, match=rf"{field}: is .* but the checkpoint .* cannot change on resume"):
        assembled_trainer(recipe, resume="auto")
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())[section or key] != data[section or key]
