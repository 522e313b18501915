"""Build a model only once its weights are known to fit it.

A model's description (config.json, config.yaml, a checkpoint's model.yaml, an adapter's
transforms) comes from a directory that may hold anything, and building a model allocates
whatever it describes: a crafted `n_embd` or LoRA rank asks for hundreds of GB, and the
allocator's traceback is all the user would see. `build_fitted` checks first, allocating nothing:

1. depth: no more layers than the weights number (the largest index in a tensor name, plus one:
   `blocks.11.`, `h.11.`, `layers.11.`), since even on the meta device a layer takes time;
2. the whole load on the meta device: building, transforms and loading run as they will for
   real, so the real rules (every tensor of the shape and dtype the model expects, no trunk
   tensor missing, a LoRA rank within its layer) refuse a description that its weights do not
   fill, before anything is allocated;
3. what passes (parameters and buffers, freshly initialised heads included) against this
   machine's memory.
Only then is the model built and loaded for real.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterable

import torch

from llm.errors import UserError
from llm.log import logger
from llm.models.base import Model


def weights_depth(names: Iterable[str]) -> int:
    """The number of layers tensor `names` can hold: their largest integer path component, plus one."""
    return 1 + max((int(part) for name in names for part in name.split(".") if part.isdigit()), default=-1)


def check_depth(tensors: Iterable[str], layers: int, where: str) -> None:
    """UserError naming `where` when a description of `layers` layers has more than the weights `tensors`
    (their names) hold: check 1 of the module docstring, before even a meta-device build."""
    held = weights_depth(tensors)
    if layers > held:
        raise UserError(f"{where}: describes {layers} layers; its weights hold {held}")


def machine_memory() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def _quiet():
    """The dry run's warnings (tensors ignored, heads freshly initialised) are the real run's too: said once."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def dry_run(build: Callable[[], Model], load: Callable[[Model, dict], Model], tensors: dict, where: str) -> None:
    """Run `load(build(), tensors)` on the meta device, allocating nothing, and check what it gives
    against this machine's memory. Raises UserError naming `where` (and whatever `build` or `load`
    raise for input they refuse)."""
    with torch.device("meta"), _quiet():
        model = load(build(), {name: torch.empty_like(t, device="meta") for name, t in tensors.items()})
        need = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if need > machine_memory():
        raise UserError(
            f"{where}: the model it describes takes {need / 2**30:.1f} GiB, more than this machine's "
            f"{machine_memory() / 2**30:.1f} GiB of memory"
        )


def build_fitted(
    build: Callable[[], Model], load: Callable[[Model, dict], Model], tensors: dict, layers: int, where: str
) -> Model:
    """`load(build(), tensors)` once the depth check and the `dry_run` passed; see the module docstring.

    `tensors`: the weights by name; `layers`: the depth the description gives; `where`: the file the
    description came from. Raises UserError naming `where` for a description its weights do not fit
    or this machine cannot hold."""
    check_depth(tensors, layers, where)
    dry_run(build, load, tensors, where)
    return load(build(), tensors)


def meta_copy(model: Model) -> Model:
    """A copy of `model` whose parameters and buffers are on the meta device (allocating none), for a
    `dry_run` of changing a model that exists."""
    memo = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)
