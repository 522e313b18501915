"""Pruning: unstructured (magnitude, Wanda), structured (attention heads, MLP neurons), gradual.

Unstructured pruning zeroes a fraction `sparsity` of the weights of every Linear layer inside the
Transformer blocks (embeddings, the LM head and task heads are left dense, as in Sun et al. 2023):
- magnitude: the smallest |W| are removed (Han et al. 2015);
- wanda: the smallest |W_ij| * ||X_j||_2 are removed, X_j being input feature j of the layer over
  a few calibration batches (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").
`scope` "layer" removes the fraction from every layer separately (Wanda: from every output row, the
paper's comparison group); "global" ranks all scores of all layers together. A `pattern` "n:m" instead
removes the n lowest-scoring of every m consecutive weights of a row (2:4 is the semi-structured sparsity
of NVIDIA's sparse tensor cores; Mishra et al. 2021), for either score. The zeros are stored densely:
unstructured sparsity does not shrink a file or speed up a dense matmul. SparseGPT lives in sparsegpt.py.

Structured pruning removes whole attention heads (under GQA whole key/value groups, i.e. a kv head
with the query heads that share it) and MLP neurons, physically shrinking the matrices. The same
number is removed from every layer; the removed units are those with the smallest weight norm
(head: ||W_q,k,v rows|| * ||W_proj columns||, neuron: ||fc_in row|| * ||fc_out column||). The
model's config keeps the original architecture and the change is the `prune` transform in the
model's record ({heads: [kv groups kept per layer], neurons: [d_ff kept per layer]}), so the loader
rebuilds the smaller shapes before loading the weights.

Gradual pruning during training: `cubic_sparsity` gives Zhu & Gupta's (2017) schedule
s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))^3; `GradualPruner` applies it as a
trainer callback (magnitude masks recomputed every `every` steps, re-applied after every step).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from llm.adapt.base import Transform
from llm.config import ConfigError, check, join, positive
from llm.errors import UserError
from llm.log import logger
from llm.models.base import Model
from llm.models.layers import Attention

METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "global")


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers inside the Transformer blocks, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".blocks." in f".{n}"]


# ----------------------------------------------------------------------------
# Unstructured
# ----------------------------------------------------------------------------


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[dict], max_batches: int) -> dict[str, torch.Tensor]:
    """||X_j||_2 over the real tokens of up to `max_batches` of `batches` (model inputs; `labels` are ignored),
    per input feature of each prunable
    Linear: {name: (in_features,) float64}. Padding (the attention mask's zeros) never counts
    (locuslab/wanda#79: counted, it shifts the keep/prune decisions of short texts in a padded batch);
    a soft prompt's positions do, as the blocks see them. Memory: one vector per layer (forward
    pre-hooks sum x^2)."""
    sums: dict[str, torch.Tensor] = {}
    real = None  # (B, T) bool: which rows of the running block's input are tokens (None: all)

    def block_hook(_block, args):
        nonlocal real
        x, mask = args[0], args[2]  # mask (B, keys): a prefix's keys first, then the block's rows
        real = None if mask is None else mask[:, -x.shape[1] :]

    hooks = [block.register_forward_pre_hook(block_hook) for block in model.transformer.blocks]
    for name, m in prunable_linears(model):

        def hook(_module, args, name=name):
            x = args[0].detach()
            x = x[real] if real is not None else x.flatten(0, -2)
            s = x.to(torch.float64).pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s

        hooks.append(m.register_forward_pre_hook(hook))
    seen = 0
    try:
        model.eval()
        for batch in itertools.islice(batches, max_batches):
            model(**{k: v for k, v in batch.items() if k != "labels"})
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise UserError("calibration data: no batches")
    return {k: v.sqrt() for k, v in sums.items()}


def parse_pattern(spec: str) -> tuple[int, int]:
    """ "n:m" -> (n, m): n of every m consecutive weights of a row are removed; UserError unless 0 < n < m."""
    n, _, m = spec.partition(":")
    if not (n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m)):
        raise UserError(f"--pattern: expected n:m with 0 < n < m (e.g. 2:4), got {spec!r}")
    return int(n), int(m)


def check_pattern(layers: list[tuple[str, nn.Linear]], pattern: tuple[int, int], spec: str) -> None:
    """UserError naming the first layer whose input width is not a multiple of m."""
    for name, m in layers:
        if m.in_features % pattern[1]:
            raise UserError(f"--pattern {spec}: {name}'s width {m.in_features} is not divisible by {pattern[1]}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The weights kept (bool, shaped as scores (N, K), K divisible by m): all but the n lowest scores of every
    m consecutive ones of a row."""
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2, largest=False).indices, False)
    return keep.view_as(scores)


@torch.no_grad()
def prune_unstructured(
    model: nn.Module,
    sparsity: float,
    method: str = "magnitude",
    scope: str = "layer",
    norms: dict[str, torch.Tensor] | None = None,
    pattern: str | None = None,
) -> dict[str, float]:
    """Zero a fraction `sparsity` (0 <= s < 1), or with `pattern` "n:m" n of every m consecutive weights of a
    row (then `sparsity` and `scope` are not used), of the prunable weights in place; see the module
    docstring. `norms` (from `input_norms`) is needed by wanda. Returns each layer's sparsity."""
    layers = prunable_linears(model)
    nm = parse_pattern(pattern) if pattern else None
    if nm:
        check_pattern(layers, nm, pattern)
    elif not 0 <= sparsity < 1:
        raise UserError(f"--sparsity: expected 0 <= s < 1, got {sparsity}")
    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if scope not in SCOPES:
        raise UserError(f"--scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    if method == "wanda" and (norms is None or any(n not in norms for n, _ in layers)):
        raise UserError("wanda needs input norms from calibration data (--data)")
    scores = {}
    for name, m in layers:
        s = m.weight.detach().abs().to(torch.float64)
        if method == "wanda":
            s = s * norms[name].to(s.device)[None, :]
        scores[name] = s
    if scope == "global" and not nm:
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(sparsity * flat.numel())
        threshold = flat.kthvalue(k).values if k else None
    result = {}
    for name, m in layers:
        s = scores[name]
        if nm:
            mask = nm_mask(s, *nm)
        elif scope == "global":
            mask = s > threshold if threshold is not None else torch.ones_like(s, dtype=torch.bool)
        else:
            group = s if method == "wanda" else s.reshape(1, -1)  # wanda: per output row
            k = int(sparsity * group.shape[1])
            mask = torch.ones_like(group, dtype=torch.bool)
            if k:
                drop = group.topk(k, dim=1, largest=False).indices
                mask.scatter_(1, drop, False)
            mask = mask.reshape(s.shape)
        m.weight.mul_(mask.to(m.weight.dtype))
        result[name] = 1.0 - mask.float().mean().item()
    return result


def sparsity_of(model: nn.Module) -> float:
    """The fraction of exact zeros among the prunable weights."""
    zeros = total = 0
    for _, m in prunable_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(total, 1)


# ----------------------------------------------------------------------------
# Structured: heads and neurons, physically removed
# ----------------------------------------------------------------------------


def _blocks(model: Model) -> list[nn.Module]:
    return list(model.transformer.blocks)


def _head_rows(attn: Attention, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of qkv and column indices of proj that belong to the kv groups `groups`."""
    hd, r = attn.head_dim, attn.n_heads // attn.kv_heads
    q_dim, kv_dim = attn.n_heads * hd, attn.kv_heads * hd
    heads = (groups[:, None] * r + torch.arange(r)).flatten()
    q = (heads[:, None] * hd + torch.arange(hd)).flatten()
    kv = (groups[:, None] * hd + torch.arange(hd)).flatten()
    return torch.cat([q, q_dim + kv, q_dim + kv_dim + kv]), q


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    bias = linear.bias is not None
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def shrink(model: Model, keep_groups: list[torch.Tensor], keep_neurons: list[torch.Tensor]) -> Model:
    """Keep, in block i, the kv groups `keep_groups[i]` and the MLP neurons `keep_neurons[i]`
    (sorted index tensors), slicing the weights; the other units are removed."""
    for block, groups, neurons in zip(_blocks(model), keep_groups, keep_neurons):
        attn, mlp = block.attn, block.mlp
        rows, cols = _head_rows(attn, groups)
        r = attn.n_heads // attn.kv_heads
        attn.qkv, attn.proj = _sliced(attn.qkv, rows=rows), _sliced(attn.proj, cols=cols)
        attn.kv_heads, attn.n_heads = len(groups), len(groups) * r
        q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.kv_heads * attn.head_dim
        attn.split = (q_dim, kv_dim, kv_dim)
        d_ff = mlp.fc_out.in_features
        fc_rows = torch.cat([neurons, d_ff + neurons]) if mlp.kind == "swiglu" else neurons
        mlp.fc_in, mlp.fc_out = _sliced(mlp.fc_in, rows=fc_rows), _sliced(mlp.fc_out, cols=neurons)
    return model


@dataclasses.dataclass
class StructuredSettings:
    """The `prune` transform's settings: the widths each block keeps (`prune_structured` records them)."""

    heads: list[int] = dataclasses.field(default_factory=list)  # kv groups kept, per block
    neurons: list[int] = dataclasses.field(default_factory=list)  # MLP width kept, per block

    def validate(self, path: str) -> None:
        for field in ("heads", "neurons"):
            if any(n <= 0 for n in getattr(self, field)):
                raise ConfigError(f"{path}.{field}", "every block keeps at least one unit")


def apply(model: Model, s: StructuredSettings, path: str = "prune") -> Model:
    """The `prune` transform: shrink every block to the recorded widths, keeping the first units
    (used when a pruned model is rebuilt; the kept weights are loaded afterwards).

    Raises ConfigError naming `path.heads` or `path.neurons` when they do not fit the model."""
    blocks = _blocks(model)
    for field, have in (
        ("heads", [b.attn.kv_heads for b in blocks]),
        ("neurons", [b.mlp.fc_out.in_features for b in blocks]),
    ):
        want = getattr(s, field)
        if len(want) != len(blocks):
            raise ConfigError(f"{path}.{field}", f"expected {len(blocks)} entries (one per block), got {len(want)}")
        if any(w > h for w, h in zip(want, have)):
            raise ConfigError(f"{path}.{field}", f"{want} exceeds the model's {have}")
    return shrink(model, [torch.arange(n) for n in s.heads], [torch.arange(n) for n in s.neurons])


TRANSFORM = Transform("prune", StructuredSettings, apply)


@torch.no_grad()
def unit_scores(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per kv group, score per MLP neuron) of one block, float64; see the module docstring."""
    attn, mlp = block.attn, block.mlp
    groups = torch.arange(attn.kv_heads)
    head = torch.empty(attn.kv_heads, dtype=torch.float64)
    for g in groups:
        rows, cols = _head_rows(attn, g[None])
        w_in = attn.qkv.weight[rows].double().norm()
        if attn.qkv.bias is not None:
            w_in = torch.sqrt(w_in**2 + attn.qkv.bias[rows].double().norm() ** 2)
        head[g] = w_in * attn.proj.weight[:, cols].double().norm()
    d_ff = mlp.fc_out.in_features
    fc_in = mlp.fc_in.weight.double()
    rows_in = fc_in[:d_ff].norm(dim=1)
    if mlp.kind == "swiglu":
        rows_in = rows_in * fc_in[d_ff:].norm(dim=1)
    if mlp.fc_in.bias is not None and mlp.kind != "swiglu":
        rows_in = torch.sqrt(rows_in**2 + mlp.fc_in.bias.double() ** 2)
    neuron = rows_in * mlp.fc_out.weight.double().norm(dim=0)
    return head, neuron


def prune_structured(model: Model, heads: int = 0, neurons: int = 0, path: str = "--structured") -> Model:
    """Remove `heads` kv groups (whole heads under MHA) and `neurons` MLP neurons from every block,
    those with the smallest scores, and record the `prune` transform. Raises UserError when a block
    would be left without heads or neurons."""
    blocks = _blocks(model)
    if heads < 0 or neurons < 0:
        raise UserError(f"{path}: counts must be >= 0")
    keep_g, keep_n = [], []
    for i, block in enumerate(blocks):
        n_groups, d_ff = block.attn.kv_heads, block.mlp.fc_out.in_features
        if heads >= n_groups or neurons >= d_ff:
            raise UserError(
                f"{path}: block {i} has {n_groups} kv groups and {d_ff} neurons; cannot remove {heads}/{neurons}"
            )
        head_score, neuron_score = unit_scores(block)
        keep_g.append(head_score.topk(n_groups - heads).indices.sort().values)
        keep_n.append(neuron_score.topk(d_ff - neurons).indices.sort().values)
    shrink(model, keep_g, keep_n)
    previous = next((t for t in model.transforms if t["name"] == "prune"), None)
    record = {"name": "prune", "heads": [len(g) for g in keep_g], "neurons": [len(n) for n in keep_n]}
    if previous is not None:  # pruning a pruned model: one record of the final widths
        previous.update(record)
    else:
        model.transforms.append(record)
    return model


def parse_structured(spec: str) -> tuple[int, int]:
    """ "heads=K,neurons=M" (either part optional) -> (K, M); UserError on anything else."""
    counts = {"heads": 0, "neurons": 0}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in counts or not value.strip().isdigit():
            raise UserError(f"--structured: expected heads=K,neurons=M, got {spec!r}")
        counts[key.strip()] = int(value)
    return counts["heads"], counts["neurons"]


# ----------------------------------------------------------------------------
# Gradual (during training)
# ----------------------------------------------------------------------------


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): the target sparsity at `step`, rising from `initial` at `start` to `final` at `end`."""
    if step <= start:
        return initial if step == start else 0.0
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


@dataclasses.dataclass
class PruneConfig:
    """A recipe's `prune:` section: gradual magnitude pruning during training (`GradualPruner`, Zhu &
    Gupta 2017's cubic schedule); sparsity 0 = off."""

    sparsity: float = 0.0  # final fraction of zero weights in the blocks' Linear layers
    start_step: int = 0
    end_step: int = 0  # the schedule reaches `sparsity` here
    every: int = 10  # steps between mask updates
    scope: Literal["layer", "global"] = "layer"

    def validate(self, path: str = "prune") -> None:
        check(0 <= self.sparsity < 1, join(path, "sparsity"), f"must be in [0, 1), got {self.sparsity}")
        if self.sparsity:
            check(self.end_step > self.start_step, join(path, "end_step"), "must be after start_step")
            positive(self, path, "every")


class GradualPruner:
    """Trainer callback (llm.train.trainer.Callback's members): magnitude-prunes the model's block
    Linears to `cubic_sparsity(step, ...)` every `prune.every` steps from `prune.start_step` to
    `prune.end_step`, and keeps pruned weights at zero after every optimizer step. Works on the
    model's own parameters, so it needs them whole and authoritative: ZeRO stage 0 with fp32 weights
    (checked by the assembly).

    Its state is the masks ({Linear name: bool tensor of its weight's shape}), so that a resumed run
    keeps the pruned weights at zero until the next pruning step (or to the end, after
    `prune.end_step`); the schedule's position is the trainer's step. ZeRO-0 keeps the same weights,
    hence the same masks, on every rank: the state is saved once."""

    name = "gradual_pruner"
    per_rank = False

    def __init__(self, model: nn.Module, prune: PruneConfig):
        self.model, self.prune = model, prune
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def on_step_end(self, trainer, metrics: dict) -> None:
        step, p = metrics["step"], self.prune
        if p.start_step <= step <= p.end_step and (step - p.start_step) % p.every == 0:
            target = cubic_sparsity(step, p.sparsity, p.start_step, p.end_step)
            prune_unstructured(self.model, target, "magnitude", p.scope)
            self.masks = {n: m.weight != 0 for n, m in prunable_linears(self.model)}
            metrics["sparsity"] = target
            logger.info(f"step {step}: pruned to sparsity {target:.3f}")
        elif self.masks:
            for name, m in prunable_linears(self.model):
                m.weight.mul_(self.masks[name].to(m.weight.dtype))

    def on_fit_end(self, trainer, preempted: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        """The saved masks, on the weights' devices (a resume keeps the model: `llm.train.recipe_change`)."""
        layers = dict(prunable_linears(self.model))
        self.masks = {name: mask.to(layers[name].weight.device) for name, mask in state["masks"].items()}
