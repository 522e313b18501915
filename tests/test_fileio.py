"""Directories replaced whole: readers see the old one or the new one, a failure changes nothing,
and what a killed writer left is cleaned up by the next one."""

import os
import subprocess
import sys

import pytest

from llm.fileio import recover_dir, replace_dir


def files(path):
    return {p.name: p.read_text() for p in path.iterdir()}


def test_a_new_directory_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, replaces=("a",)) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with replace_dir(out, replaces=("a",)) as tmp:
        assert files(out) == {"a": "1", "b": "1"}  # the old one stays whole while the new one is built
        (tmp / "a").write_text("2")
    assert files(out) == {"a": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_inside_leaves_the_old_directory_and_no_staging(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, replaces=("a",)) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(out, replaces=("a",)) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("disk full")
    assert files(out) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_in_the_way_is_refused_and_kept(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"), replace_dir(tmp_path / "out", replaces=("a",)):
        pass
    assert files(tmp_path) == {"out": "a file"}


@pytest.mark.parametrize("moment", ["building", "moved_aside"])
def test_a_killed_writer_leaves_the_old_or_new_directory_and_the_next_one_cleans_up(tmp_path, moment):
    """SIGKILL while the new directory is being built, or (on a file system without an atomic
    exchange) after the old one was moved aside: the old one is there, or is put back."""
    out = tmp_path / "out"
    with replace_dir(out, replaces=("a",)) as tmp:
        (tmp / "a").write_text("old")
    script = f"""
import os, signal
from pathlib import Path
from llm import fileio
out = Path({str(out)!r})
if {moment!r} == "moved_aside":
    fileio._exchange = lambda a, b: False
    real = os.replace
    def replace(a, b):
        real(a, b)
        if Path(b).name.endswith(".previous"):
            os.kill(os.getpid(), signal.SIGKILL)
    fileio.os.replace = replace
with fileio.replace_dir(out, replaces=("a",)) as tmp:
    (tmp / "a").write_text("new")
    if {moment!r} == "building":
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    recover_dir(out)
    assert files(out) == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
