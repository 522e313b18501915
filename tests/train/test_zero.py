"""ZeRO 1, 2 and 3 on 2 ranks give the losses of one rank with the same global batch."""

import pytest

from tests.train.helpers import TINY, losses, run, write_recipe

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, micro batch 4: the same 4 samples per step that 2 ranks x micro batch 2 see."""
    d = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(d / "recipe.yaml", TINY)
    run(recipe, 1, f"run_dir={d / 'run'}", "train.micro_batch_size=4", "checkpoint.save_final=false")
    return recipe, losses(d / "run")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_single_rank(stage, reference, tmp_path):
    recipe, ref = reference
    run(
        recipe,
        2,
        f"run_dir={tmp_path / 'run'}",
        "train.micro_batch_size=2",
        f"deepspeed.zero_stage={stage}",
        "checkpoint.save_final=false",
    )
    got = losses(tmp_path / "run")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5]
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < 1e-5, (step, got[step], ref[step])
    assert ref[5] < ref[1]  # it trained


def test_mpirun_discovery_matches_single_rank(reference, tmp_path):
    """mpirun -n 2: ranks found through mpi4py (OMPI_COMM_WORLD_*), same losses as one rank."""
    import subprocess
    from pathlib import Path

    from tests.train.helpers import PYTHON, ROOT, env

    recipe, ref = reference
    mpirun = Path(PYTHON).with_name("mpirun")
    sets = [f"run_dir={tmp_path / 'run'}", "train.micro_batch_size=2", "deepspeed.zero_stage=2"]
    sets += ["checkpoint.save_final=false"]
    cmd = [str(mpirun), "-n", "2", "--allow-run-as-root", "--oversubscribe"]
    for var in ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS"):
        cmd += ["-x", var]
    cmd += [PYTHON, "-m", "llm", "pretrain", str(recipe), "--resume", "none"]
    cmd += [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(tmp_path / "run")
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < 1e-5
