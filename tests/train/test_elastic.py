"""Elastic resume: a ZeRO-2 or ZeRO-3 checkpoint of 2 ranks resumes on 1 and one of 1 rank on 2
(real torchrun processes), keeping the global batch (2 ranks x micro 2 x accum 1 = 1 rank x micro 2 x
accum 2); the losses after resume match the uninterrupted run's and the data position is the same."""

import pytest

from llm.train import checkpoint as ckpt
from llm.train.safe_load import load as safe_load
from tests.train.helpers import TINY, losses, run, write_recipe

pytestmark = pytest.mark.distributed

STEPS = 4
LAYOUT = {2: ["train.grad_accum=1"], 1: ["train.grad_accum=2"]}  # the same global batch of 4 sequences


def train_run(recipe, run_dir, ranks, stage, resume="none"):
    sets = [
        f"run_dir={run_dir}",
        f"deepspeed.zero_stage={stage}",
        f"train.max_steps={STEPS}",
        "train.micro_batch_size=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        "logging.progress=false",
        *LAYOUT[ranks],
    ]
    return run(recipe, ranks, *sets, resume=resume, timeout=300)


def data_position(step_dir):
    return safe_load(step_dir / "trainer_rank_0.pt")["data"]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_resumes_on_another_number_of_ranks(stage, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    full = {ranks: tmp_path / f"full{ranks}" for ranks in (2, 1)}
    for ranks, run_dir in full.items():
        train_run(recipe, run_dir, ranks, stage)
    one, two = losses(full[1]), losses(full[2])
    for step in range(1, STEPS + 1):  # the same samples per step on either number of ranks
        assert abs(one[step] - two[step]) <= 1e-4 * abs(two[step]), step
    for saved, resumed in ((2, 1), (1, 2)):
        source = full[saved] / "checkpoints" / ckpt.step_tag(2)
        run_dir = tmp_path / f"resume{saved}to{resumed}"
        log = train_run(recipe, run_dir, resumed, stage, resume=str(source))
        assert "converting to DeepSpeed's universal format" in log and f"resumed from {source} at step 2" in log
        after, reference = losses(run_dir), losses(full[saved])
        assert sorted(after) == [3, 4]
        for step in (3, 4):
            assert abs(after[step] - reference[step]) <= 1e-4 * abs(reference[step]), (saved, resumed, step)
        end = ckpt.step_tag(STEPS)
        assert data_position(run_dir / "checkpoints" / end) == data_position(full[saved] / "checkpoints" / end)
