"""Callbacks keep their state through checkpoints: a run killed with SIGKILL and resumed with
`--resume auto` continues each callback's count from the checkpoint's value; state the same on every
rank is saved once (rank 0) and comes back on any number of ranks, per-rank state comes back to its
own rank and is refused, in one line, on another number of ranks."""

import os
import signal
import subprocess
import time

import pytest

from llm.errors import UserError
from llm.run.recipe import resolve_recipe
from llm.train import checkpoint as ckpt
from llm.train.safe_load import load as safe_load
from tests.train.callback_worker import RankTally, StepCounter, records
from tests.train.helpers import ROOT, TINY, TORCHRUN, descendants, env, losses, wait_for_first_checkpoint, write_recipe

pytestmark = pytest.mark.distributed

MAX_STEPS = 30
SETS = {
    "train.max_steps": MAX_STEPS,
    "train.micro_batch_size": 2,
    "checkpoint.every_steps": 3,
    "deepspeed.zero_stage": 0,
    "logging.progress": False,
}


def worker(recipe, run_dir) -> list[str]:
    sets = [f"{k}={v}" for k, v in {**SETS, "run_dir": run_dir}.items()]
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "tests.train.callback_worker", str(recipe), *sets]


def test_callback_state_survives_sigkill_and_resume_auto(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    run_dir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            worker(recipe, run_dir), cwd=ROOT, env=env(), stdout=log, stderr=log, start_new_session=True
        )
    wait_for_first_checkpoint(run_dir / "checkpoints", proc)
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert max(records(run_dir, "step_counter", 0)) < MAX_STEPS, "the run finished before it could be killed"
    saved = ckpt.find_checkpoint(run_dir / "checkpoints")
    resumed_from = ckpt.step_number(saved)

    done = subprocess.run(worker(recipe, run_dir), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    trained = losses(run_dir)
    assert sorted(trained) == list(range(1, MAX_STEPS + 1))
    for rank in (0, 1):
        counter, tally = records(run_dir, "step_counter", rank), records(run_dir, "rank_tally", rank)
        for step in range(1, MAX_STEPS + 1):  # from zero these would restart at 1 after `resumed_from`
            assert counter[step]["seen"] == step, (rank, step, resumed_from)
            assert tally[step] == (rank + 1) * step, (rank, step, resumed_from)  # its own rank's, not rank 0's
        # the tensor too: the loss of every step, those before the kill from the checkpoint
        assert counter[MAX_STEPS]["losses"] == [trained[s] for s in range(1, MAX_STEPS + 1)]

    # rank 0 saves every callback's state, rank 1 only the one that differs per rank
    final = run_dir / "checkpoints" / ckpt.step_tag(MAX_STEPS)
    own = {rank: safe_load(final / f"trainer_rank_{rank}.pt")["callbacks"] for rank in (0, 1)}
    assert set(own[0]) == {"validation", "step_counter", "rank_tally"} and set(own[1]) == {"rank_tally"}
    assert own[0]["step_counter"]["seen"] == MAX_STEPS and own[1]["rank_tally"]["tally"].item() == 2 * MAX_STEPS

    # on one rank: the shared state comes back, the per-rank state is refused in one line
    from llm.run.train import assemble
    from llm.train.distributed import init_distributed

    data = {**TINY, "run_dir": str(tmp_path / "one"), "deepspeed": {"zero_stage": 0}}
    data["train"] = {**TINY["train"], "max_steps": MAX_STEPS, "micro_batch_size": 2, "grad_accum": 2}
    one = resolve_recipe(data)
    with pytest.raises(UserError, match=r"callback 'rank_tally' keeps a state per rank.* on 1 \(resume on 2 ranks\)"):
        assemble(one, init_distributed(), str(final), callbacks=[StepCounter(), RankTally()])
    counter = StepCounter()
    trainer = assemble(one, init_distributed(), str(final), callbacks=[counter]).trainer
    assert trainer.step == counter.seen == MAX_STEPS
    assert counter.losses.tolist() == [trained[s] for s in range(1, MAX_STEPS + 1)]
