"""Small helpers shared by the Triton ops: row views, block sizes, program counts."""

from __future__ import annotations

import functools

import torch
import triton

# One program keeps a whole row in registers; beyond this many elements a row
# would spill, so the norms decline (the dispatcher then falls back).
MAX_FUSED_ELEMENTS = 65536


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as (rows, last_dim), contiguous."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def row_block(n: int) -> int:
    """The power-of-two block that covers a row of n elements."""
    return triton.next_power_of_2(n)


def num_warps_for(block: int) -> int:
    """More warps for wider rows: about 256 elements per warp, 1 to 16 warps."""
    return min(max(block // 256, 1), 16)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_partial_programs(x: torch.Tensor, rows: int) -> int:
    """How many programs share the rows of a backward pass; each writes one partial
    sum of the weight gradient, so a few per SM keeps the final reduction small."""
    if x.is_cuda:
        return max(1, min(rows, 4 * _sm_count(x.device.index or 0)))
    return max(1, min(rows, 4))  # the interpreter runs programs one after another


def too_wide(n: int) -> str | None:
    if n > MAX_FUSED_ELEMENTS:
        return f"rows of {n} elements exceed the {MAX_FUSED_ELEMENTS} a single Triton program keeps in registers"
    return None
