"""Reading checkpoint files without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a crafted file whose
`__reduce__` calls `os.system` would run on load. Every load llm makes, and every load
DeepSpeed makes on llm's behalf (its TorchCheckpointEngine, zero_to_fp32, the universal
checkpoint converter, all of which pass weights_only=False), goes through `safe_loads()`:
inside it `torch.load` reads with weights_only=True and an allow-list of the few plain
types DeepSpeed stores (enums, a named tuple, the loss scaler whose state is numbers), and
nothing that other libraries added to torch's allow-list when imported (torchao's tensor
subclasses: `llm.fileio.torch_load`).
A file that needs anything else, or that is not a readable checkpoint at all (truncated,
overwritten), is one `CheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from llm.errors import UserError
from llm.fileio import torch_load


class CheckpointError(UserError):
    """A checkpoint file that is damaged, incomplete or holds objects it may not (code)."""


def allowed_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoints hold (ZeRO 0-3, fp32/bf16/fp16, universal format),
    and numpy arrays (the RNG state in trainer files of llm before 0.2): plain data whose
    reconstruction calls no user code. Imported lazily (DeepSpeed is heavy)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_core = getattr(np, "_core", None) or np.core
    numpy_types = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_types]


_lock = threading.RLock()
_depth = 0
_original_load = torch.load


def load(f, map_location=None, **kwargs):
    """`torch.load` with weights_only=True and the allow-list; any failure is a CheckpointError naming `f`
    (`llm.fileio.torch_load`)."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    return torch_load(f, allowed_globals(), CheckpointError, "checkpoint", map_location=map_location, **kwargs)


@contextlib.contextmanager
def safe_loads():
    """Within this block every `torch.load` (ours and DeepSpeed's) is `load` above. Re-entrant."""
    global _depth
    with _lock:
        if _depth == 0:
            torch.load = _safe_torch_load
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = _original_load


def _safe_torch_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
    return load(f, map_location=map_location, **kwargs)
