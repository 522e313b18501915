"""Compile a C source shipped with the package at first use and load it with ctypes.

The CPU kernels are plain C on raw pointers (llm/kernels/csrc/*.c), so the system compiler builds one in
about a second, on the machine that runs it, with no torch headers. The shared library goes to a cache
directory (``$LLM_EXTENSIONS_DIR``, else ``$LLM_CACHE/extensions``, else ``~/.cache/llm/extensions``) under
a name that hashes the source, the compiler's identity and the flags: an edited source, another compiler or
another instruction set gets its own file. A file lock keeps ranks that start together from building the
same file twice, and the compiler writes to a temporary name that is renamed into place, so a half-written
library is never loaded (as torch.utils.cpp_extension and DeepSpeed's op builder do). ctypes releases the
GIL during a call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from filelock import FileLock

SOURCES = Path(__file__).parent / "csrc"
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp")
# Instruction sets the kernels are built for, with the flags that enable them.
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma"), "avx512": ("-mavx512f", "-mavx2", "-mfma")}
# torch's run-time CPU check (cpuinfo: CPUID and the OS's XSAVE state) -> the instruction sets it implies;
# torch's AVX2 level requires FMA, its AVX512 level AVX-512 F/BW/VL/DQ.
ISAS_OF_CAPABILITY = {"AVX2": ("avx2",), "AVX512": ("avx2", "avx512")}


class BuildError(RuntimeError):
    """No compiler, or the compiler failed; the message says which, in one line."""


def cache_dir() -> Path:
    if os.environ.get("LLM_EXTENSIONS_DIR"):
        return Path(os.environ["LLM_EXTENSIONS_DIR"])
    return Path(os.environ.get("LLM_CACHE", Path.home() / ".cache" / "llm")) / "extensions"


def cpu_isas() -> tuple[str, ...]:
    """The instruction sets of ISA_FLAGS that this CPU and OS can run (none off x86)."""
    return ISAS_OF_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ())


def compiler() -> str:
    """The C compiler: $CC, else the first of cc, gcc, clang on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"no C compiler found (looked for {', '.join(candidates)}; set CC to one)")


@functools.cache
def _identity(cc: str) -> str:
    """The compiler's first line of `--version`, so a compiler upgrade rebuilds."""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"the C compiler {cc} does not run: {e}") from None


def load(source: str, isa: str) -> ctypes.CDLL:
    """Build (once per cache directory) and load csrc/`source` for instruction set `isa` of ISA_FLAGS.

    Raises BuildError naming the compiler and its first error line."""
    cc = compiler()
    path_c = SOURCES / source
    flags = (*BASE_FLAGS, *ISA_FLAGS[isa])
    key = hashlib.sha256(b"\0".join([path_c.read_bytes(), _identity(cc).encode(), " ".join(flags).encode()]))
    out_dir = cache_dir()
    library = out_dir / f"{path_c.stem}-{isa}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{library}.lock"):
            if not library.exists():
                partial = library.with_suffix(f".{os.getpid()}.tmp")
                run = subprocess.run([cc, *flags, str(path_c), "-o", str(partial)], capture_output=True, text=True)
                if run.returncode != 0:
                    partial.unlink(missing_ok=True)
                    errors = [line for line in run.stderr.splitlines() if "error" in line] or run.stderr.splitlines()
                    raise BuildError(f"{Path(cc).name} failed on {source} ({isa}): {(errors or ['no output'])[0]}")
                os.replace(partial, library)
    return ctypes.CDLL(str(library))
