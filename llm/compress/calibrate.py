"""Layer-by-layer calibration: the driver under GPTQ, AWQ and SparseGPT (`opt_sequential` in the GPTQ
reference implementation, IST-DASLab/gptq opt.py).

The calibration batches run through the embeddings once, and their hidden states at the first block's input
are kept. Then, block by block: the block moves to the compute device; the algorithm reads what it needs
through a `Calibration` (input statistics of the block's Linear layers, forward passes, the block's output
error) and changes the block's weights; the hidden states are replaced by the block's outputs with its
compressed weights, which are the next block's inputs. Peak memory: the calibration hidden states at one
block (B x T x d per batch), one block's weights on the device and the algorithm's statistics (a K x K
float64 sum per Linear); the other blocks stay where they are (e.g. on the CPU). Padding positions (the
attention mask's zeros) never count in a statistic or an error.

Over the ranks of a launch (torch.distributed initialised), each rank passes its share of the batches.
Blocks are sequential, so the ranks share the samples, not the blocks: every statistic is a float64 sum
over real tokens, all-reduced per block, so each rank holds the one-rank statistic (up to the order of the
additions); the layers' solves in a block are split over the ranks (layer j on rank j mod world size) and
broadcast, so every rank ends with the same weights and does 1/world of the forward passes and solves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from llm.errors import UserError
from llm.log import logger


@dataclasses.dataclass
class BlockInput:
    """One batch at a block's input: hidden (B, T, d), rotary (cos, sin) or None, key padding mask (B, T) bool
    (True: a real token) or None (all real), document ids (B, T) of packed rows or None."""

    hidden: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    document_ids: torch.Tensor | None = None

    def through(self, block: nn.Module) -> torch.Tensor:
        """The block's output for this input."""
        return block(self.hidden, self.rope, self.mask, document_ids=self.document_ids)

    def real(self) -> torch.Tensor:
        """(B, T) bool: the positions that count."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.hidden.shape[:2], dtype=torch.bool, device=self.hidden.device)


@dataclasses.dataclass
class LinearStats:
    """Sums over the real tokens of every rank of a Linear's input x (K,): x x^T (K, K) and |x| (K,), float64."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int

    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / n (K, K) float64: the Hessian of the layer's squared output error ||WX - QX||^2 / n
        (Frantar et al. 2022, section 3)."""
        return 2 * self.xtx / self.tokens

    def mean_abs(self) -> torch.Tensor:
        """mean |x| per input channel (K,) float64: AWQ's activation scale."""
        return self.abs_sum / self.tokens


class Calibration:
    """One block's calibration data on this rank, and the collectives that make its statistics global."""

    def __init__(self, inputs: list[BlockInput], group: dist.ProcessGroup | None = None):
        self.inputs, self.group = inputs, group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def forward(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs, one (B, T, d) per batch of this rank."""
        return [x.through(block) for x in self.inputs]

    def linear_stats(self, block: nn.Module) -> dict[str, LinearStats]:
        """Input statistics of every Linear in the block (names relative to it), over one forward pass."""
        linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        device = next(block.parameters()).device
        xtx = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device) for n, m in linears}
        abs_sum = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in linears}
        real = None

        def hook(name):
            def accumulate(_module, args):
                x = args[0][real].float()  # (tokens, K); each batch's product in float32, summed in float64
                xtx[name] += (x.T @ x).double()
                abs_sum[name] += x.abs().sum(0).double()

            return accumulate

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
        try:
            for x in self.inputs:
                real = x.real()
                x.through(block)
        finally:
            for h in handles:
                h.remove()
        tokens = int(self.all_reduce(torch.tensor(sum(int(x.real().sum()) for x in self.inputs), device=device)))
        return {n: LinearStats(self.all_reduce(xtx[n]), self.all_reduce(abs_sum[n]), tokens) for n, _ in linears}

    def squared_error(self, block: nn.Module, targets: list[torch.Tensor]) -> float:
        """mean over the real tokens of every rank of ||block(x) - target||^2 (targets as `forward` gives them)."""
        device = next(block.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, target in zip(self.inputs, targets):
            real = x.real()
            total[0] += (x.through(block) - target)[real].double().pow(2).sum()
            total[1] += real.sum()
        total = self.all_reduce(total)
        return float(total[0] / total[1])

    def shared(
        self, jobs: list[Callable[[], tuple[torch.Tensor, ...]]], templates: list[tuple[torch.Tensor, ...]]
    ) -> list[tuple[torch.Tensor, ...]]:
        """Run job j on rank j mod world size and broadcast its tensors (shaped as templates[j]) to every rank:
        each rank first runs its own jobs, then all take part in the broadcasts in order."""
        own = {j: job() for j, job in enumerate(jobs) if j % self.world == self.rank}
        results = []
        for j, template in enumerate(templates):
            values = own.get(j) or tuple(torch.empty_like(t) for t in template)
            if self.world > 1:
                for t in values:
                    dist.broadcast(t, group=self.group, group_src=j % self.world)
            results.append(values)
        return results


class _Captured(Exception):
    """Raised by the stand-in for the first block once it holds the block's inputs: the forward stops there."""


class _Catcher(nn.Module):
    def __init__(self, inputs: list[BlockInput]):
        super().__init__()
        self.inputs = inputs

    def forward(self, x, rope=None, key_padding_mask=None, cache=None, prefix=None, document_ids=None):
        self.inputs.append(BlockInput(x, rope, key_padding_mask, document_ids))
        raise _Captured


def _capture(model: nn.Module, batches: Iterable[dict], device: torch.device) -> list[BlockInput]:
    """The first block's inputs of every batch: the model runs with its blocks replaced by a catcher, so only
    the embeddings move to `device`."""
    trunk = model.transformer
    blocks, inputs = trunk.blocks, []
    home = next(model.parameters()).device
    trunk.blocks = nn.ModuleList([_Catcher(inputs)])
    try:
        model.to(device)
        for batch in batches:
            try:
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
            except _Captured:
                pass
    finally:
        model.to(home)
        trunk.blocks = blocks
    return inputs


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict],
    compress_block: Callable[[str, nn.Module, Calibration], None],
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Run `batches` (this rank's model inputs; `labels` are ignored) through the model block by block and call
    compress_block(block's name, block, calibration) on each; see the module docstring. `device` computes
    (default: where the model is). The model is put in eval mode.

    Raises UserError ("calibration data: ...") when there are no batches, or fewer real tokens over all ranks than
    the widest Linear's input width (below that its Hessian is singular), or the model carries a soft prompt or a
    prefix (their virtual tokens are not calibration inputs)."""
    trunk = model.transformer
    if trunk.prompt is not None or trunk.prefix is not None:
        raise UserError(
            "calibration data: the model carries a soft prompt or a prefix; merge or remove it before compressing"
        )
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inputs = _capture(model, batches, device)
    calibration = Calibration(inputs, group)
    counts = torch.tensor([len(inputs), sum(int(x.real().sum()) for x in inputs)], dtype=torch.float64, device=device)
    n_batches, tokens = (int(c) for c in calibration.all_reduce(counts))
    if not n_batches:
        raise UserError("calibration data: no batches")
    width, widest = max(
        (m.in_features, f"transformer.blocks.{i}.{name}")
        for i, block in enumerate(trunk.blocks)
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear)
    )
    if tokens < width:
        raise UserError(
            f"calibration data: {tokens} real tokens; at least {width} are needed (the input width of {widest}): "
            "give more or longer samples"
        )
    for i, block in enumerate(trunk.blocks):
        home = next(block.parameters()).device
        block.to(device)
        compress_block(f"transformer.blocks.{i}", block, calibration)
        for x in inputs:
            x.hidden = x.through(block)
        block.to(home)
        ranks = f" over {calibration.world} ranks" if calibration.world > 1 else ""
        logger.info(f"calibrated block {i + 1}/{len(trunk.blocks)} on {tokens:,} tokens{ranks}")
