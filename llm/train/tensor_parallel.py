"""Tensor parallelism (`parallel.tensor`): every block's linears split over the adjacent ranks of a tensor group.

The scheme of Megatron-LM (Shoeybi et al., 2019, section 3): attention's fused qkv and the MLP's fc_in are
column-parallel, so rank r of N computes n_heads/N query heads with the kv_heads/N key/value heads they read
(q, k and v cut per piece, `llm.models.layers.TensorSplit`), and the same columns of gate and up; proj and
fc_out are row-parallel, each rank multiplying its part of the input features, and one all-reduce sums the
ranks' outputs. Each block thus costs two all-reduces forward (`_SumOverGroup`, Megatron's g) and two backward
(`_CopyToGroup`, its conjugate f: the input of a column-parallel layer is whole on every rank, and its gradient
is the sum of every rank's part). Embeddings, norms, the row-parallel biases and the task's head stay whole on
every rank (the fused linear cross-entropy and tied embeddings keep working; the vocabulary is not split).

Why llm's own layers, not DeepSpeed's AutoTP training: llm fuses q, k, v (with GQA) and gate + up into one
linear each, which a split must cut per piece, and AutoTP finds layers by Hugging Face module names and builds
its own process groups; here the split is one declared plan per layer (`tensor_parallel_plan()`), the groups
are those of the data x sequence x tensor mesh (`llm.train.parallel`), and DeepSpeed receives them as a
Megatron-style `mpu`, the interface its ZeRO 1-2 optimizers have long used for model parallelism.

Gradients. A sharded parameter's gradient is whole on its rank (the f/g pair makes each rank's backward exact
for its part). A replicated parameter sees the same inputs and output gradients on every rank of the group, so
its gradient is identical there without communication, except the qk-norm weights, which act on this rank's
heads only: a hook sums theirs over the group (`sum_gradient`). DeepSpeed averages gradients and shards ZeRO
states over the data-parallel group, the data x sequence ranks of one tensor index (`get_data_parallel_group`);
its gradient norm counts sharded parameters (`tensor_model_parallel`) on every rank and others once.
Every rank of a tensor group reads the same samples; the trainer's loss weights count each token once per rank
and so stay exact (`Trainer.train_step`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llm.errors import UserError
from llm.models.layers import TensorSplit
from llm.train.parallel import Mesh


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient summed over `group` backward (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """The sum over `group` forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@torch.compiler.disable  # collectives stay outside compiled graphs (llm.train.parallel.SequenceParallel)
def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


@torch.compiler.disable
def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverGroup.apply(x, group)


class ParallelLinear(nn.Linear):
    """This rank's part of a whole linear layer `full`, cut by `split` (a `TensorSplit`): column-parallel
    (dim 0: x (..., in) whole on every rank -> (..., out / N) of this rank's columns) or row-parallel (dim 1:
    x (..., in / N) of this rank's features -> (..., out), summed over the group, the bias added once)."""

    def __init__(self, full: nn.Linear, split: TensorSplit, tp: TensorParallel):
        weight = split.shard(full.weight.detach(), tp.rank, tp.size)
        super().__init__(weight.shape[1], weight.shape[0], full.bias is not None, device="meta")
        self.split, self.group, self.rank, self.size = split, tp.group, tp.rank, tp.size
        self.weight = nn.Parameter(weight.clone(), requires_grad=full.weight.requires_grad)
        self.weight.tensor_model_parallel = True  # DeepSpeed's gradient norm counts it on every rank
        if full.bias is not None:
            bias = full.bias.detach()
            self.bias = nn.Parameter(
                (split.shard(bias, tp.rank, tp.size) if split.dim == 0 else bias).clone(),
                requires_grad=full.bias.requires_grad,
            )
            self.bias.tensor_model_parallel = split.dim == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split.dim == 0:
            return F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        y = sum_over_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        kind = "column" if self.split.dim == 0 else "row"
        return f"{super().extra_repr()}, {kind}-parallel rank {self.rank} of {self.size}"


class TensorParallel:
    """This rank's place in its tensor group (`group`, `rank`, `size`) and its data-parallel group
    (`data_group`: the ranks of every data and sequence index with this tensor index), with the members of
    Megatron's `mpu` that DeepSpeed calls (`deepspeed.initialize(mpu=...)`)."""

    def __init__(self, group, data_group):
        self.group, self.data_group = group, data_group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def shard(self, linear: nn.Module, split: TensorSplit) -> ParallelLinear:
        """This rank's `ParallelLinear` of a whole nn.Linear; UserError for any other module (a transform's)."""
        if type(linear) is not nn.Linear:
            raise UserError(
                f"tensor parallelism splits plain linear layers, not {type(linear).__name__}: "
                "train without transforms (LoRA, quantization, pruning) under parallel.tensor"
            )
        return ParallelLinear(linear, split, self)

    def sum_gradient(self, param: nn.Parameter) -> None:
        """Sum `param`'s gradient over the group before it accumulates (a whole parameter used on this
        rank's part of the work only)."""

        def hook(grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=self.group)
            return grad

        param.register_hook(hook)

    @torch.no_grad()
    def whole_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with every `ParallelLinear`'s parts gathered from the group into the whole
        tensors, on every rank (all ranks of the group call it)."""
        state = model.state_dict()
        for prefix, module in model.named_modules():
            if isinstance(module, ParallelLinear):
                for name, split in module.split.of_parameters(module.bias is not None).items():
                    part = state[f"{prefix}.{name}"].contiguous()
                    parts = [torch.empty_like(part) for _ in range(self.size)]
                    dist.all_gather(parts, part, group=self.group)
                    state[f"{prefix}.{name}"] = split.merge(parts)
        return state

    # -- Megatron's mpu, as DeepSpeed asks for it -----------------------------------------

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return self.rank

    def get_model_parallel_world_size(self) -> int:
        return self.size

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data_group)


def tensor_parallel(device_mesh, mesh: Mesh) -> TensorParallel | None:
    """This rank's `TensorParallel` on a `device_mesh` of `mesh` (every rank calls it: it makes the
    data-parallel groups); None without a tensor dimension."""
    if device_mesh is None or mesh.tensor == 1:
        return None
    data_group = None
    for tp in range(mesh.tensor):  # every rank creates every group, in the same order
        ranks = [mesh.rank(dp, sp, tp) for dp in range(mesh.data) for sp in range(mesh.sequence)]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            data_group = group
    return TensorParallel(device_mesh["tensor"].get_group(), data_group)


@torch.no_grad()
def grad_norm(parameters: list[nn.Parameter], tensor: TensorParallel | None) -> float:
    """The L2 norm of the whole model's gradient from this rank's parameters (those with a gradient): the
    squares of the sharded ones (`tensor_model_parallel`) summed over the tensor group, the whole ones
    counted once."""
    zero = torch.zeros((), dtype=torch.float64, device=parameters[0].grad.device)
    whole, sharded = zero.clone(), zero.clone()
    for p in parameters:
        square = p.grad.detach().double().square().sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += square
        else:
            whole += square
    if tensor is not None:
        dist.all_reduce(sharded, group=tensor.group)
    return float((whole + sharded).sqrt())


def merge_shards(
    shards: list[dict[str, torch.Tensor]], splits: dict[str, TensorSplit], where: str
) -> dict[str, torch.Tensor]:
    """One whole state dict of the tensor ranks' state dicts `shards` (rank order): the tensors named in
    `splits` (`llm.models.layers.tensor_parallel_splits` of the whole model) merged from every rank's part, the
    others whole from the first rank that holds them (DeepSpeed's consolidation may name a tied alias on one rank
    only). UserError naming `where` when the parts do not fit together."""
    whole: dict[str, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        for name, tensor in shard.items():
            if name in whole and name not in splits and whole[name].shape != tensor.shape:
                raise UserError(f"{where}: {name} is {tuple(tensor.shape)} on tensor rank {rank}, not as on rank 0")
            whole.setdefault(name, tensor)
    try:
        for name, split in splits.items():
            if name in whole:
                whole[name] = split.merge([s[name] for s in shards])
    except (KeyError, RuntimeError, ValueError) as e:  # a part missing, or one that does not cut as the model says
        raise UserError(f"{where}: the tensor ranks' weights do not merge into the model it describes ({e})") from None
    return whole
