"""An installed (not editable) llm finds its own presets: no file of the repository is needed at run time."""

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_trains_a_recipe_naming_the_zero2_preset(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # the dependencies come from this environment's site-packages, read as plain paths (their .pth files,
    # such as the editable install of the checkout, are not processed); llm itself is installed fresh
    target_site = next((env_dir / "lib").glob("python*/site-packages"))
    (target_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIP_NO_INDEX="1", LLM_NO_CUDA_EXT="1")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation",
         str(ROOT)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = {
        "model": {"base": "gpt2-tiny", "n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64,
                  "vocab_size": 128, "max_seq_len": 32},
        "data": {"source": "synthetic", "seq_len": 16},
        "train": {"micro_batch_size": 2, "max_steps": 3, "log_every": 1},
        "deepspeed": {"preset": "zero2"},
        "logging": {"tensorboard": False},
        "run_dir": "run",
    }  # fmt: skip
    (elsewhere / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    probe = subprocess.run([python, "-c", "import llm; print(llm.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert str(target_site) in probe.stdout, (probe.stdout, probe.stderr)  # the installed copy, not the checkout
    run = subprocess.run([python, "-m", "llm", "pretrain", "recipe.yaml"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 3 steps" in run.stderr
    assert (elsewhere / "run" / "export" / "model.safetensors").is_file()
