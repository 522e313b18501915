"""What `llm convert --to FORMAT` (and a run's export) writes: one module per format.

Each module holds one format and answers two questions:
- `check(model) -> str | None`: why the format cannot hold `model` (one line naming what is missing),
  or None when it can; nothing is written before every check has passed;
- `write(model, out_dir, tokenizer=None, **options)`: write `model` into `out_dir`, an empty staging
  directory that the caller swaps in whole (`llm.fileio.replace_dir`); `tokenizer` is the path of a
  tokenizer.json or None; `options` are the format's own flags of `llm convert` (keyword-only; the
  command refuses a flag the chosen format's `write` does not take). An optional runtime dependency is
  imported inside `write` through `require`, so that a missing one is one line naming its `pip install`.

`llm.run.convert.FORMATS` lists them by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llm.errors import UserError


def require(module: str, package: str | None = None) -> ModuleType:
    """Import the optional dependency `module`; UserError naming `pip install PACKAGE` where it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this format needs {package or module}: pip install {package or module}") from None
