"""The README as a new user follows it: every bash and python code block, top to bottom, in a fresh copy
of the checkout, each succeeding as written.

Which blocks run is the README's to say: every block fenced as bash or python runs unless the line just
before it is `<!-- readme-test: skip (why) -->` (the README's first comment explains this), so a section
added later is covered, or left out where it says why. Blocks without a language (sample output) are text.

The copy holds the checkout's tracked and unignored files only (no data/, runs/, .venv of this one). Its
.venv is this test's own environment, laid out as `make` leaves it (the interpreter and the installed
packages, the stamp newer than setup.py): installing torch and the rest is what `make` does once per
machine, and CI has just done it. Blocks then run with .venv/bin first on PATH, as after
`source .venv/bin/activate`, and the copy first on PYTHONPATH, as its editable install would put it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<why>[^)]+)\) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


def code_blocks(text: str) -> list[dict]:
    """Every fenced block of a Markdown text: language, code, first line number, and the skip reason
    when the line before it is a skip marker. HTML comments are not searched for fences."""
    lines = text.splitlines()
    blocks, i, in_comment = [], 0, False
    while i < len(lines):
        line = lines[i]
        if in_comment or line.startswith("<!--"):
            in_comment = "-->" not in line
            i += 1
            continue
        match = FENCE.match(line)
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = SKIP.match(lines[start - 1].strip()) if start else None
        blocks.append({"lang": match["lang"], "code": "\n".join(body) + "\n", "line": start + 1,
                       "skip": before["why"] if before else None})  # fmt: skip
        i += 1
    return blocks


def test_readme_blocks_are_classified():
    blocks = code_blocks((ROOT / "README.md").read_text())
    runnable = [b for b in blocks if b["lang"] in ("bash", "python")]
    assert any(b["skip"] is None and "make quickstart" in b["code"] for b in runnable)
    for b in blocks:
        assert b["lang"] in ("", "bash", "python"), f"README.md:{b['line']}: fence language {b['lang']!r}"
        if b["skip"] is not None:
            assert b["lang"] in ("bash", "python") and b["skip"].strip(), f"README.md:{b['line']}"


def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked and unignored files (as in the working tree) under `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def this_environment_as_venv(venv: Path) -> None:
    """`make`'s .venv, pointing at the interpreter and packages running this test."""
    prefix = Path(sys.prefix)
    (venv / "bin").mkdir(parents=True)
    cfg = prefix / "pyvenv.cfg"
    base = Path(sys._base_executable).parent
    (venv / "pyvenv.cfg").write_text(cfg.read_text() if cfg.is_file() else f"home = {base}\n")
    for tool in (prefix / "bin").iterdir():  # python, llm, pip, pytest, torchrun, deepspeed...
        if tool.name.startswith(("activate", "Activate")):
            continue
        (venv / "bin" / tool.name).symlink_to(tool.resolve() if tool.name.startswith("python") else tool)
    site = Path(sysconfig.get_paths()["purelib"])
    target = venv / site.relative_to(prefix)
    target.parent.mkdir(parents=True)
    target.symlink_to(site)
    (venv / ".installed").touch()  # newer than setup.py: make has nothing to install


@pytest.mark.slow
def test_readme_top_to_bottom_in_a_fresh_copy():
    # its own folder, not tmp_path: on a machine shared with other pytest sessions, theirs prune old tmp_paths
    with tempfile.TemporaryDirectory(prefix="llm-readme-") as tmp:
        follow_readme(Path(tmp))


def follow_readme(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "llm")
    this_environment_as_venv(clone / ".venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}  # fmt: skip
    env.update(PATH=f"{clone / '.venv' / 'bin'}:{env.get('PATH', '')}", PYTHONPATH=str(clone))
    timings = []
    for block in code_blocks((clone / "README.md").read_text()):
        if block["lang"] not in ("bash", "python") or block["skip"] is not None:
            continue
        if block["lang"] == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-x", "-c", block["code"]]
        else:
            cmd = [str(clone / ".venv" / "bin" / "python"), "-c", block["code"]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        timings.append((block["line"], round(time.perf_counter() - start, 1)))
        assert proc.returncode == 0, (
            f"README.md:{block['line']} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    print("README blocks (line, seconds):", timings)
    assert len(timings) >= 3
    # what the README says these commands leave behind
    assert (clone / "runs" / "quickstart" / "export" / "model.safetensors").is_file()
    assert (clone / "runs" / "gpt" / "metrics.png").is_file()
    assert (clone / "exported" / "gpt" / "config.json").is_file()
    assert (clone / "models" / "tiny" / "model.safetensors").is_file()
