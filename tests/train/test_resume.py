"""Checkpoints: a run killed with SIGKILL and resumed logs the losses of an uninterrupted run;
a ZeRO-3 checkpoint consolidates to the weights the engine trained."""

import os
import signal
import subprocess
import time

import pytest
import torch

from llm.cli import main
from llm.run.loader import load_pretrained
from llm.train import checkpoint as ckpt
from tests.conftest import rel_err
from tests.train.helpers import (
    ROOT,
    TINY,
    command,
    descendants,
    env,
    losses,
    run,
    wait_for_first_checkpoint,
    write_recipe,
)

pytestmark = pytest.mark.distributed

MAX_STEPS = 40
STEPS = [
    f"train.max_steps={MAX_STEPS}",
    "checkpoint.every_steps=3",
    "train.micro_batch_size=2",
    "deepspeed.zero_stage=2",
    "data.seq_len=32",
]


def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run(recipe, 2, f"run_dir={tmp_path / 'full'}", *STEPS, resume="none")
    full = losses(tmp_path / "full")

    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            command(recipe, 2, f"run_dir={killed}", *STEPS, resume="auto"),
            cwd=ROOT,
            env=env(),
            stderr=log,
            stdout=log,
            start_new_session=True,
        )
    wait_for_first_checkpoint(killed / "checkpoints", proc)
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    before = losses(killed)
    assert max(before) < MAX_STEPS, "the run finished before it could be killed"
    saved = ckpt.find_checkpoint(killed / "checkpoints")
    resumed_from = int(saved.name.split("_")[1])

    log = run(recipe, 2, f"run_dir={killed}", *STEPS, resume="auto")
    assert f"resumed from {saved}" in log
    after = losses(killed)
    assert sorted(after) == list(range(1, MAX_STEPS + 1))
    for step in range(resumed_from + 1, MAX_STEPS + 1):
        assert after[step] == full[step], (step, after[step], full[step])
    for step in range(1, resumed_from + 1):
        assert before[step] == full[step]


GATHER = """
import sys, torch, deepspeed
from llm.run.recipe import load_recipe
from llm.run.train import assemble
from llm.train.distributed import init_distributed
recipe = load_recipe(sys.argv[1], sys.argv[2:])
trainer = assemble(recipe, init_distributed(), "auto").trainer
trainer.fit()
params = dict(trainer.model.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    full = {k: v.detach().clone().float() for k, v in params.items()}
if trainer.rank == 0:
    torch.save(full, recipe.run_dir + "/gathered.pt")
"""


def test_zero3_checkpoint_consolidates_to_trained_weights(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    run_dir = tmp_path / "run"
    sets = [f"run_dir={run_dir}", "train.micro_batch_size=2", "deepspeed.zero_stage=3", "train.max_steps=3"]
    proc = subprocess.run(
        [command(recipe, 2)[0], "--standalone", "--nproc_per_node", "2", str(script), str(recipe), *sets],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    gathered = torch.load(run_dir / "gathered.pt", weights_only=True)
    # `llm convert` consolidates the ZeRO-3 shards into an llm model directory (safetensors)
    exported = tmp_path / "exported"
    assert main(["convert", str(run_dir / "checkpoints"), str(exported)]) == 0
    model = load_pretrained(exported)
    own = dict(model.named_parameters())
    assert set(own) == set(gathered)
    for name, value in gathered.items():
        assert rel_err(own[name], value) == 0.0, name
    # it trained: the weights moved away from the initialisation of the same seed
    from llm.tasks import build_model

    torch.manual_seed(1234)
    fresh = build_model(model.config).state_dict()
    name = "transformer.blocks.0.attn.qkv.weight"
    assert rel_err(own[name], fresh[name]) > 1e-4


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    """SLURM preemption: SIGTERM -> checkpoint at the current step, status 0; the requeued job resumes there."""
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    # the deepspeed launcher passes --local_rank=N: accepted
    cmd = command(recipe, 1, f"run_dir={run_dir}", "train.max_steps=100000", resume="auto") + ["--local_rank=0"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=log)
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not losses(run_dir):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    saved = ckpt.find_checkpoint(run_dir / "checkpoints")
    step = int(saved.name.split("_")[1])
    assert step >= 1 and "SIGTERM received" in (tmp_path / "log").read_text()
    log = run(recipe, 1, f"run_dir={run_dir}", f"train.max_steps={step + 2}", resume="auto")
    assert f"resumed from {saved} at step {step}" in log
    assert max(losses(run_dir)) == step + 2
