"""Parallelism beyond data parallelism: the `parallel:` section, the device mesh, and Ulysses sequence
parallelism.

The world's ranks form a mesh data x sequence x tensor, row-major: rank = (dp * sequence + sp) * tensor + tp,
so a tensor-parallel group is adjacent ranks (one node), then sequence, then data, the order of Megatron and
torchtitan. `Mesh` is that arithmetic (checked before any process group); `device_mesh` builds torch's
DeviceMesh over it, whose `mesh["sequence"]` / `mesh["tensor"]` give each dimension's process group.

Sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): the `sequence` ranks of a group read the same
samples and each holds T/N consecutive positions of them (`SequenceSlices`). Everything outside attention
works per position on the slice; around attention an all-to-all turns q, k and v from (B, H, T/N, D) into
(B, H/N, T, D), every position of H/N heads, and the output back (`SequenceParallel`, installed into the
trunk with `Transformer.set_sequence_parallel`). Activations other than attention's per-head work shrink N-fold.

The all-to-all is our own `torch.distributed.all_to_all_single`, the collective DeepSpeed's
`DistributedAttention` uses (both run on gloo), on the models' (B, H, T, D) layout without DeepSpeed's
transposes to (B, T, H, D), and keeping the model layer free of the engine.

Gradients: DeepSpeed is given no sequence-parallel group, so it treats every rank as data parallel: ZeRO
shards over all ranks and averages gradients over all of them. Rank r's backward gives the gradient of its
own positions' loss terms, the parts that flow through other ranks' keys and values sent back by the
all-to-all's backward, so the sum of the ranks' gradients is the batch's. The trainer weights rank r's
micro-batch mean by n_r x world / N (`Trainer.train_step`: n_r its loss tokens, N all ranks'), so the average
DeepSpeed takes is the gradient of the mean over every loss token of the global batch, under every ZeRO stage
alike (DeepSpeed's own sequence-parallel path scales stage 0 and stages 1-3 differently: DeepSpeed#5248, #7833).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from llm.config import ConfigError, positive
from llm.kernels.reference import IGNORE_INDEX
from llm.models.config import ModelConfig

DIMS = ("data", "sequence", "tensor")


@dataclasses.dataclass
class ParallelConfig:
    """The `parallel:` section: how many ranks share each sample (`sequence`, Ulysses) and each layer
    (`tensor`); the world's other factor is data parallelism, world = data x sequence x tensor."""

    sequence: int = 1  # ranks that split every sample's positions (its heads must divide by it)
    tensor: int = 1  # ranks that split every layer's weights

    def validate(self, path: str = "parallel") -> None:
        positive(self, path, "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The sizes of the data x sequence x tensor mesh; rank = (dp * sequence + sp) * tensor + tp."""

    data: int
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def of(cls, config: ParallelConfig, world_size: int) -> Mesh:
        """The mesh of `world_size` ranks; ConfigError naming `parallel` when sequence x tensor does not divide it."""
        shared = config.sequence * config.tensor
        if world_size % shared:
            raise ConfigError(
                "parallel",
                f"{world_size} ranks do not divide into sequence {config.sequence} x tensor {config.tensor} "
                f"(world = data x sequence x tensor); launch a multiple of {shared} ranks",
            )
        return cls(world_size // shared, config.sequence, config.tensor)

    @property
    def world_size(self) -> int:
        return self.data * self.sequence * self.tensor

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp, sp, tp) of `rank`."""
        rest, tp = divmod(rank, self.tensor)
        dp, sp = divmod(rest, self.sequence)
        return dp, sp, tp

    def rank(self, dp: int, sp: int, tp: int) -> int:
        return (dp * self.sequence + sp) * self.tensor + tp


def device_mesh(mesh: Mesh, device: torch.device):
    """torch's DeviceMesh of `mesh` over the started default process group (every rank calls it), its
    dimensions named data, sequence and tensor; None when every rank is data parallel (DeepSpeed's world
    group is then the only one)."""
    if mesh.sequence == mesh.tensor == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (mesh.data, mesh.sequence, mesh.tensor), mesh_dim_names=DIMS)


def sequence_parallel(device_mesh) -> SequenceParallel | None:
    """This rank's `SequenceParallel` on a `device_mesh`; None without a sequence dimension."""
    if device_mesh is None or device_mesh["sequence"].size() == 1:
        return None
    return SequenceParallel(device_mesh["sequence"].get_group())


# the families whose blocks tensor parallelism splits (llm.train.tensor_parallel)
TENSOR_FAMILIES = ("gpt", "llama")


def check_model(config: ParallelConfig, model: ModelConfig, path: str = "model") -> None:
    """The model splits as `config` asks. Ulysses gives each rank of a sequence group n_heads / sequence query
    heads and kv_heads / sequence key and value heads (query head h reads key head h // (n_heads / kv_heads),
    on the same rank only then); tensor parallelism gives each rank n_heads / tensor and kv_heads / tensor of
    them, and d_ff / tensor of the MLP width, of a gpt or llama model; together each rank computes
    n_heads / (sequence x tensor) heads. ConfigError naming the model's field otherwise."""
    s, t = config.sequence, config.tensor
    if t > 1 and model.family not in TENSOR_FAMILIES:
        raise ConfigError(
            f"{path}.family", f"tensor parallelism splits {' and '.join(TENSOR_FAMILIES)} models, not {model.family}"
        )
    over = " x ".join(f"parallel.{k}={n}" for k, n in (("sequence", s), ("tensor", t)) if n > 1)
    if s > 1 and t > 1:
        why = "Ulysses and tensor parallelism split the heads"
    else:
        why = "Ulysses splits the heads over a sequence group" if s > 1 else "tensor parallelism splits the heads"
    for field, heads in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads)):
        if heads % (s * t):
            kind = "query" if field == "n_heads" else "key/value"
            raise ConfigError(f"{path}.{field}", f"{heads} {kind} heads do not divide over {over} ranks ({why})")
    if model.d_ff % t:
        raise ConfigError(f"{path}.d_ff", f"{model.d_ff} does not divide over parallel.tensor={t} ranks")


# ----------------------------------------------------------------------------
# Ulysses: the all-to-all around attention
# ----------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into N chunks along `scatter_dim`, send chunk i to rank i of `group`, and concatenate the
    chunks that arrive along `gather_dim` in rank order."""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """`_all_to_all`; its gradient is the inverse exchange (an all-to-all only moves elements)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, gather_dim, scatter_dim), None, None, None


class SequenceParallel:
    """This rank's place in its sequence-parallel group, and the exchanges the trunk and its attention call
    (see the module docstring). Shapes: B batch, H heads, T the whole (padded) sequence, N the group's size.

    The collectives run outside torch.compile's graphs: a traced all-to-all that fills a buffer in place
    would lose its gradient (DeepSpeed's sequence/layer.py describes that failure)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    @torch.compiler.disable
    def to_head_shards(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T/N, D) of this rank's positions -> (B, H/N, T, D) of this rank's heads."""
        return _AllToAll.apply(x, self.group, 1, 2)

    @torch.compiler.disable
    def to_sequence_shards(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H/N, T, D) of this rank's heads -> (B, H, T/N, D) of this rank's positions."""
        return _AllToAll.apply(x, self.group, 2, 1)

    @torch.compiler.disable
    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T/N) of this rank's positions (a mask, document ids) -> (B, T) of the group's; no gradient."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def mean(self, loss: torch.Tensor, count: int) -> torch.Tensor:
        """The group's mean of per-rank means `loss` over `count` terms each, weighted by the counts."""
        sums = torch.stack([loss.detach().double() * count, loss.new_tensor(count, dtype=torch.float64)])
        dist.all_reduce(sums, group=self.group)
        return (sums[0] / sums[1].clamp(min=1)).to(loss.dtype)


# ----------------------------------------------------------------------------
# The data: each rank's slice of its group's samples
# ----------------------------------------------------------------------------


def slice_batch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank` of `size`'s positions of a token batch: every (B, T, ...) tensor is padded on the right
    to T' = a multiple of `size` and cut to positions [rank T'/size, (rank + 1) T'/size).

    Labels are already shifted (labels[:, t] is position t's target), so no target is lost at a slice's edge.
    `position_ids` (absent: 0 .. T-1; (1, T): the same for every row) stay the global positions. Padded
    positions get no target (-100) and no key (`attention_mask` 0, made when the batch has none);
    `document_ids` continue with one more id, so the padding is a document of its own. Per-sample tensors
    (B,) are kept whole."""
    ids = batch["input_ids"]
    b, t = ids.shape
    padded = -(-t // size) * size
    out = dict(batch)
    out["position_ids"] = batch.get("position_ids", torch.arange(t, device=ids.device)).expand(b, t)
    if padded > t and "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(ids)
    width = padded // size
    for key, value in out.items():
        if value.dim() < 2 or value.shape[:2] != (b, t):
            continue
        if padded > t:
            if key == "document_ids":  # a document after the last
                fill = value[:, -1:] + 1
            else:  # labels: no target; attention_mask: no key; ids, positions: 0
                fill = torch.full((), IGNORE_INDEX if key == "labels" else 0, dtype=value.dtype, device=value.device)
            value = torch.cat((value, fill.expand(b, padded - t, *value.shape[2:])), dim=1)
        out[key] = value[:, rank * width : (rank + 1) * width]
    return out


class SequenceSlices:
    """This rank's slice (`slice_batch`) of each micro-batch of `batches`, the batches of its data-parallel
    rank (every rank of a sequence group reads the same). State and rewind are those of `batches`."""

    def __init__(self, batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size

    def next_batch(self) -> dict | None:
        batch = self.batches.next_batch()
        return None if batch is None else slice_batch(batch, self.rank, self.size)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def rewind(self) -> None:
        self.batches.rewind()
