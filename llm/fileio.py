"""Files in and out: writing files and directories so that a reader never sees half of one, and
reading what a model, adapter, checkpoint or data directory names without trusting it (a name stays
inside its directory, a weights file is read as tensors only, a damaged file is one line naming it)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from pathlib import Path

from llm.errors import UserError


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
    target = Path(os.path.abspath(target))
    staging, previous = _staging(target), _previous(target)
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, target)
    if staging.exists():
        shutil.rmtree(staging)


@contextlib.contextmanager
def replace_dir(target: str | Path, replaces: tuple[str, ...]):
    """Build a directory in a staging folder beside `target` and swap it in whole on success.

        with replace_dir(out, replaces=("config.json",)) as tmp:
            (tmp / "config.json").write_text(...)

    `replaces`: the names that mark an earlier output of this writer. An existing `target` that is
    not empty and holds none of them is refused (UserError) before anything is written, so that a
    mistyped output path never deletes a folder of other files.

    Readers see the old directory or the new one, never a mix: the swap is one atomic
    rename-exchange (Linux renameat2); where the file system cannot exchange, the old directory is
    renamed aside and the new one renamed in, and a reader may briefly find no directory. A kill at
    any point leaves the old or the new one in place; the next call (or `recover_dir`) removes what
    is left. On an exception inside the block nothing changes and the staging folder is removed.
    Raises NotADirectoryError, before anything is written, where `target` is a file."""
    target = Path(os.path.abspath(target))  # "." and "out/" have a name to stage beside
    if target.exists() and not target.is_dir():  # an exchange would swap the file out and leave it as staging
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    if target.is_dir() and any(target.iterdir()) and not any((target / name).exists() for name in replaces):
        raise UserError(
            f"{target}: exists and holds no {' or '.join(replaces)} (not an earlier output); "
            "refusing to replace it: name a new or empty directory"
        )
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


# ----------------------------------------------------------------------------
# Reading what a directory names
# ----------------------------------------------------------------------------


def contained(directory: str | Path, name) -> Path | None:
    """`directory / name` when `name`, read from a manifest or an index of `directory`, names a file
    inside it: a relative path without `..` whose real path (links followed) stays inside; else None.

    The one exception is the layout of the Hugging Face hub cache, whose snapshot files link into
    the repository's blobs/ (`snapshots/REV/NAME -> ../../blobs/HASH`)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    directory = Path(directory)
    path, root = directory / name, directory.resolve()
    real = path.resolve()
    if real.is_relative_to(root):
        return path
    if root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs":
        return path
    return None


def load_safetensors(path: str | Path) -> dict:
    """The tensors of a safetensors file (CPU). Raises UserError naming the file when it is missing or
    is not a safetensors file (random bytes, a truncated or oversized header)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


_torch_load_lock = threading.Lock()


def torch_load(f, allowed=(), error: type[UserError] = UserError, what: str = "torch", **kwargs):
    """`torch.load(f, weights_only=True)`: tensors, plain data and the `allowed` globals only.

    Libraries add their own types to torch's allow-list for the whole process when imported (torchao
    its tensor subclasses, whose rebuilding runs torchao's code); no file llm reads needs them, so
    they are set aside while `f` is read. A file that holds anything else, or that is not a readable
    `what` file at all (truncated, overwritten), raises `error` naming it; a missing one raises
    FileNotFoundError."""
    import pickle

    import torch

    name = str(f) if isinstance(f, (str, os.PathLike)) else str(getattr(f, "name", f))  # a path, or an open file
    try:
        with _torch_load_lock:
            registered = torch.serialization.get_safe_globals()
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(list(allowed))
            try:
                try:  # torch.serialization.load, not torch.load, which `llm.train.safe_load.safe_loads` patches
                    return torch.serialization.load(f, weights_only=True, **kwargs)
                except RuntimeError as e:
                    if not kwargs.get("mmap") or "mmap can only be used" not in str(e):
                        raise
                    kwargs["mmap"] = False  # a file in torch's legacy format: read it (safely) without mmap
                    return torch.serialization.load(f, weights_only=True, **kwargs)
            finally:
                torch.serialization.clear_safe_globals()
                torch.serialization.add_safe_globals(registered)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise error(
            f"{name}: refused to load: it holds objects beyond tensors and plain data "
            f"(a crafted or foreign file?): {reason.strip()}"
        ) from None
    except FileNotFoundError:
        raise
    except Exception as e:  # damaged bytes fail anywhere in torch's reader: KeyError, struct.error, RuntimeError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{name}: not a readable {what} file (truncated or damaged?): {reason}") from None


# ----------------------------------------------------------------------------
# A file held by one process at a time
# ----------------------------------------------------------------------------


class Held(UserError):
    """A lock file that another process holds; `holder` is what it wrote into the file."""

    def __init__(self, path: Path, holder: str):
        self.holder = holder
        super().__init__(f"{path}: held by {holder}")


@contextlib.contextmanager
def held(path: str | Path, holder: str):
    """Hold an exclusive lock on file `path` (created if missing) for the block, with `holder` (who:
    pid, host) written into it for whoever is refused.

    The lock is flock(2): the kernel drops it when the process ends, however it ends, so a killed
    holder leaves nothing behind. Across nodes it holds where the file system arbitrates flock
    (NFSv4, NFSv3 with lockd: Linux emulates flock with byte-range locks there; Lustre mounted with
    -o flock, not -o localflock). A file system without locks (ENOLCK, EOPNOTSUPP) holds nothing:
    the block runs with a warning. Raises `Held` when another process holds it."""
    from llm.log import logger

    with _lock_file(path, exclusive=True) as (fd, other, error):
        if other is not None:
            raise Held(Path(path), other)
        if error is not None:
            logger.warning(f"{path}: this file system cannot lock ({error}); a second job is not refused")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
        yield


def holder_of(path: str | Path) -> str | None:
    """Who holds the lock `held` takes on file `path` (what they wrote into it), None when nobody does.
    Takes a shared lock and drops it at once: probes do not refuse each other."""
    if not Path(path).is_file():
        return None
    with _lock_file(path, exclusive=False) as (_, other, _):
        return other


@contextlib.contextmanager
def _lock_file(path: str | Path, exclusive: bool):
    """(fd, the holder's text when another process holds the lock else None, the OSError of a file
    system that cannot lock else None), the lock held for the block when it was free."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        other = error = None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        except OSError as e:
            error = e
        yield fd, other, error
    finally:
        os.close(fd)
