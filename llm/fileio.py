"""Writing files and directories so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A crash leaves either the old file or the new one, never a mix (rename is atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# Directories replaced whole
# ----------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two existing paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    kernel, libc or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.staging")


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def recover_dir(target: str | Path) -> None:
    """Undo what a process killed inside `replace_dir(target)` left: a staged directory is dropped;
    an old directory moved aside with no new one in its place is put back."""
    target = Path(target)
    staging, previous = _staging(target), _previous(target)
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, target)
    if staging.exists():
        shutil.rmtree(staging)


@contextlib.contextmanager
def replace_dir(target: str | Path):
    """Build a directory in a staging folder beside `target` and swap it in whole on success.

        with replace_dir(out) as tmp:
            (tmp / "config.json").write_text(...)

    Readers see the old directory or the new one, never a mix: the swap is one atomic
    rename-exchange (Linux renameat2); where the file system cannot exchange, the old directory is
    renamed aside and the new one renamed in, and a reader may briefly find no directory. A kill at
    any point leaves the old or the new one in place; the next call (or `recover_dir`) removes what
    is left. On an exception inside the block nothing changes and the staging folder is removed.
    Raises NotADirectoryError, before anything is written, where `target` is a file."""
    target = Path(target)
    if target.exists() and not target.is_dir():  # an exchange would swap the file out and leave it as staging
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    staging = _staging(target)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging)  # now the old directory
        return
    if target.exists():
        os.replace(target, _previous(target))
    os.replace(staging, target)
    shutil.rmtree(_previous(target), ignore_errors=True)
