"""DeepSpeed's CPU allreduce buffer (64 MiB of /dev/shm per rank) does not outlive the run."""

import subprocess

from llm.train.distributed import _free_port, shm_buffer_path
from tests.train.helpers import ROOT, TINY, command, env, write_recipe


def test_a_run_leaves_no_shared_memory_buffer_behind(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "run_dir": str(tmp_path / "run")})
    port = str(_free_port())
    run_env = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    out = subprocess.run(
        command(recipe, 1, "train.max_steps=1", resume="none"),
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    assert not shm_buffer_path(0).exists()  # DeepSpeed 0.19 left it there
