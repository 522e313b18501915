"""A JIT build lock left by a killed build is refused by name instead of hanging every later start."""

import os
import time

import pytest

from llm.errors import UserError
from llm.train.distributed import STALE_BUILD_LOCK_S, check_build_lock


def lock_file(tmp_path, monkeypatch, age_s: float):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_named(tmp_path, monkeypatch):
    lock = lock_file(tmp_path, monkeypatch, STALE_BUILD_LOCK_S + 60)
    with pytest.raises(UserError, match=f"{lock}: a build lock .* left by a killed build of some_op"):
        check_build_lock("some_op")
    assert lock.exists()  # another process may still own it: the user decides


def test_a_fresh_lock_or_none_is_waited_for(tmp_path, monkeypatch, caplog):
    check_build_lock("some_op")  # no lock: nothing to say
    lock_file(tmp_path, monkeypatch, 5)
    check_build_lock("some_op")
    assert "waiting for another process to finish building some_op" in caplog.text
