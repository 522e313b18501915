"""Elastic resume: a ZeRO-2 or ZeRO-3 checkpoint of 2 ranks resumes on 1 rank (micro-batch 4, or 2 with
grad_accum 2) and one of 1 rank on 2 (real torchrun processes), keeping the global batch of 4 sequences.
The losses after resume continue the uninterrupted run's to rel 1e-6 (fp32; only the order in which
gradients are summed differs) and the data position is the same. The reference is the uninterrupted
run of the saving world; a resumed run that misses any of the optimizer state (Adam's moments, its step
count, each param group's weight decay) drifts from the first step after resume by rel > 1e-5."""

import pytest

from llm.train import checkpoint as ckpt
from llm.train.safe_load import load as safe_load
from tests.train.helpers import TINY, losses, run, write_recipe

pytestmark = pytest.mark.distributed

STEPS = 4
TOLERANCE = 1e-6


def train_run(recipe, run_dir, split, stage, resume="none"):
    """`split`: the global batch of 4 sequences as "RANKSxMICROxACCUM"."""
    ranks, micro, accum = (int(n) for n in split.split("x"))
    sets = [
        f"run_dir={run_dir}",
        f"deepspeed.zero_stage={stage}",
        f"train.max_steps={STEPS}",
        f"train.micro_batch_size={micro}",
        f"train.grad_accum={accum}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        "logging.progress=false",
    ]
    return run(recipe, ranks, *sets, resume=resume, timeout=300)


def data_position(step_dir):
    return safe_load(step_dir / "trainer_rank_0.pt")["data"]


def assert_close(after: dict, reference: dict, steps, what):
    for step in steps:
        assert abs(after[step] - reference[step]) <= TOLERANCE * abs(reference[step]), (*what, step)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_resumes_on_another_number_of_ranks(stage, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", TINY)
    full = {split: tmp_path / f"full{split}" for split in ("2x2x1", "1x2x2")}
    for split, run_dir in full.items():
        train_run(recipe, run_dir, split, stage)
    assert_close(losses(full["1x2x2"]), losses(full["2x2x1"]), range(1, STEPS + 1), ("uninterrupted",))
    for saved, resumed in (("2x2x1", "1x2x2"), ("2x2x1", "1x4x1"), ("1x2x2", "2x2x1")):
        source = full[saved] / "checkpoints" / ckpt.step_tag(2)
        run_dir = tmp_path / f"resume{saved}to{resumed}"
        log = train_run(recipe, run_dir, resumed, stage, resume=str(source))
        assert (source / "universal" / "DONE").is_file() and f"resumed from {source} at step 2" in log
        after = losses(run_dir)
        assert sorted(after) == [3, 4]
        assert_close(after, losses(full[saved]), (3, 4), (saved, resumed))
        end = ckpt.step_tag(STEPS)
        assert data_position(run_dir / "checkpoints" / end) == data_position(full[saved] / "checkpoints" / end)
