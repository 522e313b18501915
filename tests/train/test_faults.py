"""Faults: malformed recipes fail in one line before any engine starts; NaN losses are skipped
or abort; a dead rank ends the job within 60 s naming the rank."""

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from llm.cli import main
from llm.run.recipe import resolve_recipe
from llm.train.distributed import Heartbeat
from tests.train.helpers import ROOT, TINY, assembled_trainer, command, descendants, env, losses, write_recipe

BAD = {
    "batch_arithmetic": (["train.global_batch_size=7"], "train.global_batch_size", "!= micro_batch_size 4"),
    "unknown_key": (["train.micro_batch=4"], "train.micro_batch", "unknown key"),
    "wrong_type": (["train.max_steps=ten"], "train.max_steps", "expected an integer"),
    "zero_lr": (["optim.lr=0"], "optim.lr", "must be > 0"),
    "bad_precision": (["train.precision=fp8"], "train.precision", "expected one of"),
    "offload_params_stage1": (["deepspeed.offload_params=true"], "deepspeed.offload_params", "needs ZeRO stage 3"),
    "unknown_preset": (["deepspeed.preset=zero9"], "deepspeed.preset", "neither a file nor a preset"),
    "bad_stage": (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "must be 0-3"),
    "seq_beyond_model": (["data.seq_len=4096"], "data.seq_len", "exceeds model.max_seq_len"),
    "missing_shards": (["data.source=shards", "data.train=/nonexistent/train"], "data.train", "no such directory"),
    "bad_betas": (["optim.betas=[0.9]"], "optim.betas", "expected two numbers"),
    "unknown_kernel_backend": (["kernels.attention=nonexistent"], "kernels", "unknown backend 'nonexistent'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_recipe_is_one_clear_line(name, tmp_path, capsys):
    sets, field, message = BAD[name]
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    args = ["pretrain", str(recipe), "--resume", "none", f"--set=run_dir={tmp_path / 'run'}"]
    args += [f"--set={s}" for s in sets]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm: error: "), err
    assert field in err[0] and message in err[0], err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _trainer(tmp_path, **train):
    data = {**TINY, "run_dir": str(tmp_path / "run"), "train": {**TINY["train"], "max_steps": 4, **train}}
    data["checkpoint"] = {"save_final": False}
    return assembled_trainer(resolve_recipe(data))


def _poison(trainer, bad_calls: set[int]):
    """Make the forward of the given (1-based) training calls return NaN."""
    forward, calls = trainer._forward, [0]

    def poisoned(batch):
        loss = forward(batch)
        if trainer.engine.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                return loss * torch.tensor(float("nan"))
        return loss

    trainer._forward = poisoned


def test_nan_loss_is_skipped_and_counted(tmp_path, capsys):
    trainer = _trainer(tmp_path, non_finite="skip")
    _poison(trainer, {2})
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["skipped"] == 1
    logged = losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    assert "non-finite loss at step 2" in capsys.readouterr().err


def test_nan_loss_aborts_when_configured(tmp_path):
    from llm.train.trainer import NonFiniteLoss

    trainer = _trainer(tmp_path, non_finite="abort")
    _poison(trainer, {3})
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        trainer.fit()


def test_heartbeat_names_a_silent_rank(tmp_path):
    beat = Heartbeat(tmp_path, rank=0, world_size=3, timeout_s=5.0)
    beat.dir.mkdir(parents=True)
    now = time.time()
    beat._started = now - 100
    (beat.dir / "rank_1").write_text(f"{now}\n")
    (beat.dir / "rank_2").write_text(f"{now - 50}\n")
    assert beat.dead_rank(now) == (2, pytest.approx(50))
    (beat.dir / "rank_2").write_text(f"{now - 50} 4242 node-7\n")  # a beat names its pid and host
    assert beat.dead_rank(now) == (2, pytest.approx(50)) and beat.describe(2) == "rank 2 (pid 4242 on node-7)"
    (beat.dir / "rank_2").write_text("done\n")
    assert beat.dead_rank(now) is None


def test_after_a_failed_collective_the_silent_peer_is_named_with_its_host(tmp_path):
    beat = Heartbeat(tmp_path, rank=0, world_size=2, timeout_s=1.0)
    beat.dir.mkdir(parents=True)
    (beat.dir / "rank_1").write_text(f"{time.time()} 4242 node-2\n")  # beats once, then falls silent
    assert beat.diagnose().startswith("rank 1 (pid 4242 on node-2) is lost: no heartbeat for ")
    (beat.dir / "rank_1").write_text("done\n")  # a peer that finished is not lost
    started = time.time()
    assert beat.diagnose() == "no rank's heartbeat stopped (a network fault?)" and time.time() - started < 3


@pytest.mark.distributed
def test_killing_one_rank_ends_the_job_naming_it(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "train.max_steps=100000", "train.micro_batch_size=2", "faults.heartbeat_timeout_s=10"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            command(recipe, 2, *sets, resume="none"),
            cwd=ROOT,
            env=env(),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 120
            while not (run_dir / "metrics.jsonl").is_file() or not losses(run_dir):
                assert proc.poll() is None and time.time() < deadline, "training did not start"
                time.sleep(0.2)
            workers = descendants(proc.pid)
            victim = next(p for p in workers if "LOCAL_RANK=1" in open(f"/proc/{p}/environ").read().replace("\0", " "))
            os.kill(victim, signal.SIGKILL)
            killed = time.time()
            status = proc.wait(timeout=60)
            assert time.time() - killed < 60
        finally:
            for p in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert status != 0
    text = (tmp_path / "log").read_text()
    assert re.search(r"rank\s*:?\s*1\b", text), text[-3000:]


def test_heartbeat_names_a_rank_whose_process_is_gone_but_not_one_of_an_earlier_run(tmp_path):
    import socket

    beat = Heartbeat(tmp_path, rank=0, world_size=3, timeout_s=1000.0)
    beat.dir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    host = socket.gethostname()
    (beat.dir / "rank_1").write_text(f"{time.time()} {os.getpid()} {host}\n")  # alive
    (beat.dir / "rank_2").write_text(f"{time.time() - 3600} {gone.pid} {host}\n")  # an earlier run's file
    assert beat.gone_rank() is None and beat.dead_rank() is None
    (beat.dir / "rank_2").write_text(f"{time.time()} {gone.pid} {host}\n")  # this run's rank 2, now gone
    assert beat.gone_rank() == (2, "its process has exited")
    assert beat.diagnose() == f"rank 2 (pid {gone.pid} on {host}) is lost: its process has exited"
