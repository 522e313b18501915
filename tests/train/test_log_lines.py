"""What a job's log shows: step lines with elapsed time and ETA (no terminal, as under SLURM), and under a
terminal's progress bar the validation line on a line of its own."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.train.helpers import ROOT, TINY, command, env, run, write_recipe


def tiny(tmp_path):
    recipe = dict(TINY, run_dir=str(tmp_path / "run"))
    recipe["train"] = dict(TINY["train"], max_steps=4, log_every=2, eval_every=2, eval_batches=1)
    recipe["data"] = dict(TINY["data"])
    return write_recipe(tmp_path / "r.yaml", recipe)


def test_step_lines_carry_elapsed_time_and_eta(tmp_path):
    err = run(tiny(tmp_path), 1)
    lines = [line for line in err.splitlines() if re.match(r"llm: step \d+/4: loss", line)]
    assert [int(re.match(r"llm: step (\d+)", line).group(1)) for line in lines] == [1, 2, 4]
    for line in lines:
        assert re.search(r", elapsed \d+:\d\d, eta \d+:\d\d$", line), line
    assert lines[-1].endswith("eta 0:00")


def test_validation_line_is_not_glued_to_the_progress_bar(tmp_path):
    recipe = tiny(tmp_path)
    leader, follower = pty.openpty()  # stderr is a terminal: the trainer draws its tqdm bar
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(command(recipe, 1), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, out[-3000:]
    text = out.decode(errors="replace").replace("\r\n", "\n")  # the terminal's newline
    assert "train:" in text  # the bar was drawn
    # what a terminal shows of each line: the text after its last carriage return (the bar redraws with \r)
    val_lines = [line.split("\r")[-1] for line in text.split("\n") if "val loss" in line]
    assert len(val_lines) == 2  # after step 2 and at the end
    for line in val_lines:
        assert re.match(r"^(\x1b\[[0-9;]*[A-Za-z])*llm: step \d+: val loss", line), repr(line)
        assert "it/s" not in line and "%|" not in line


def test_the_terminal_shows_only_what_llm_says(tmp_path):
    """Dependency chatter stays out of the terminal (issue 21): a ZeRO-3 run (DeepSpeed's start-up print,
    torch's deprecations inside its collectives, its ZeRO-3 hook warning), a convert of its checkpoint
    without DS_ACCELERATOR (DeepSpeed's "Setting accelerator to CPU") and a quantization print llm's
    lines only, at INFO and at LLM_LOG_LEVEL=DEBUG (a quantization no longer imports torchao, whose
    "Failed to load ... _C_mxfp8" was its chatter). Real commands, one process each (~20 s): the chatter
    comes from imports and process-group start-up."""
    recipe = tiny(tmp_path)
    run = subprocess.run(
        command(recipe, 1, "deepspeed.zero_stage=3", "train.max_steps=2", "train.eval_every=0"),
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert [line for line in run.stdout.splitlines() if not line.startswith("llm: ")] == []
    no_accelerator_named = {k: v for k, v in env().items() if k != "DS_ACCELERATOR"}  # as a user runs it
    convert = ["convert", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"), "--to", "hf"]
    converted = subprocess.run(
        [sys.executable, "-m", "llm", *convert],
        cwd=ROOT, env=no_accelerator_named, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stdout[-3000:]
    answer = f"read training checkpoint {tmp_path / 'run' / 'checkpoints'} "  # the command's answer, on stdout
    assert [line for line in converted.stdout.splitlines() if not line.startswith(("llm: ", answer))] == []
    quantize = ["compress", "quantize", str(tmp_path / "run" / "export")]
    for level, out in (("INFO", "q"), ("DEBUG", "q-debug")):
        proc = subprocess.run(
            [sys.executable, "-m", "llm", *quantize, str(tmp_path / out)],
            cwd=ROOT, env={**env(), "LLM_LOG_LEVEL": level}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line != str(tmp_path / out)]  # the command's answer
        if level == "INFO":
            assert [line for line in lines if not line.startswith("llm: ")] == []
        else:
            assert all(line.startswith("llm[rank 0]: ") for line in lines), lines
            assert not any("torchao" in line for line in lines), lines
