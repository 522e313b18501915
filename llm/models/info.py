"""Size, compute and memory of a model (build it on the meta device to allocate nothing).

FLOPs follow the usual accounting (PaLM appendix B, Megatron): a matmul with an
(m x k) weight costs 2k FLOPs per output per token forward and twice that
backward, so training costs 6 FLOPs per matmul parameter per token, plus
attention scores and values, 12 * n_layers * d_model * seq_len per token (full
square, causal masking not discounted). Embedding lookups cost nothing; a tied
output projection is a matmul and counts.

Model-state memory for mixed-precision Adam is 16 bytes per parameter: 2 for
the half-precision weights, 2 for their gradients, 12 for the fp32 master copy
and the two moments. ZeRO-1 shards the 12, ZeRO-2 also the gradients, ZeRO-3
everything (Rajbhandari et al., 2020). Tensor parallelism over t ranks splits
every block's linear layers t ways first (embeddings, norms, row-parallel biases
and the head stay whole: `parameters_per_rank`); ZeRO then shards each rank's
parameters over the other ranks.

Activation memory follows Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2-3): a layer keeps
s b h (10 + 24/t + 5 a s / (h t)) bytes of 16-bit activations for backward (s
sequence, b micro-batch, h d_model, a heads, t tensor-parallel ranks; MHA and a
4h GELU MLP, whose constants other shapes only approximate). The 5 a s^2 b term
is attention's scores, softmax and dropout mask, which a fused attention kernel
(flash attention) never stores. Ulysses sequence parallelism over N ranks leaves
each rank s/N positions of every tensor outside attention and a/N heads of every
position inside it: every term divides by N. Activation checkpointing keeps each
layer's 2 s b h input bytes and one layer's activations while it is recomputed.
"""

from __future__ import annotations

from torch import nn

from llm.models.config import ModelConfig
from llm.models.layers import LMHead, tensor_parallel_splits

BYTES_WEIGHTS, BYTES_GRADS, BYTES_OPTIMIZER = 2, 2, 12


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in a matmul per token (weights of Linear layers, the patch
    projection and the output projection, tied ones once), excluding biases, norms and lookups."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, LMHead)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += int(getattr(module.weight, "ds_numel", module.weight.numel()))
    return total


def training_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per token (per patch for ViT) of `model` (any device, meta too)."""
    cfg: ModelConfig = model.config
    seq = seq_len or cfg.seq_len
    return 6.0 * matmul_parameters(model) + 12.0 * cfg.n_layers * cfg.d_model * seq


def parameters_per_rank(model: nn.Module, tensor: int = 1) -> int:
    """Parameters a rank of a `tensor`-parallel group holds: 1 / tensor of each block linear's weight (and
    column-parallel bias), every other parameter whole (llm.train.tensor_parallel)."""
    split = tensor_parallel_splits(model)
    return sum(p.numel() // tensor if name in split else p.numel() for name, p in model.named_parameters())


def zero_memory_per_rank(n_params: int, ranks: int, stage: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state under ZeRO `stage`."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    weights = n_params * BYTES_WEIGHTS / (ranks if stage >= 3 else 1)
    grads = n_params * BYTES_GRADS / (ranks if stage >= 2 else 1)
    optimizer = n_params * BYTES_OPTIMIZER / (ranks if stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "total": weights + grads + optimizer}


def activation_memory_per_rank(
    cfg: ModelConfig, seq_len: int, micro_batch: int = 1, sequence: int = 1, tensor: int = 1
) -> dict[str, float]:
    """Bytes of activations a rank keeps for backward (16-bit, see the module docstring): "eager" (attention
    scores stored), "fused" (flash attention), "checkpointed" (fused, with activation checkpointing)."""
    s, b, h, a, t = seq_len / sequence, micro_batch, cfg.d_model, cfg.n_heads, tensor
    per_layer = s * b * h * (10 + 24 / t)
    scores = s * b * 5 * a * seq_len / t
    layers = cfg.n_layers
    return {
        "eager": layers * (per_layer + scores),
        "fused": layers * per_layer,
        "checkpointed": layers * 2 * s * b * h + per_layer,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_model_info(
    model, ranks: int = 8, seq_len: int | None = None, micro_batch: int = 1, sequence: int = 1, tensor: int = 1
) -> str:
    """Parameters, FLOPs per token, and the memory per rank of a built `model` (meta device is fine) on `ranks`
    ranks = data x `sequence` x `tensor`: the ZeRO table of model states and the activations of a micro-batch."""
    cfg = model.config
    n, per_rank = model.num_parameters(), parameters_per_rank(model, tensor)
    seq = seq_len or cfg.seq_len
    flops = training_flops_per_token(model, seq)
    unit = "patch" if cfg.is_image else "token"
    layout = f"{ranks} ranks = {ranks // (sequence * tensor)} data x {sequence} sequence x {tensor} tensor"
    lines = [
        f"model: {cfg.family} {model.task}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.kv_heads} kv), d_ff {cfg.d_ff}, {cfg.norm} {cfg.norm_position}-norm, "
        f"{cfg.position} positions, {cfg.mlp}",
        f"parameters: {n:,}" + (f", {per_rank:,} per tensor-parallel rank" if tensor > 1 else ""),
        f"training FLOPs per {unit} (seq {seq}): {flops:,.0f} ({flops / 1e9:,.2f} GFLOP)",
        f"model-state memory per rank, mixed-precision Adam (16 bytes/param), {layout}:",
        f"  {'ZeRO':<6}{'weights':>16}{'grads':>16}{'optimizer':>16}{'total':>16}",
    ]
    for stage in range(3 if tensor > 1 else 4):  # llm's tensor parallelism runs with ZeRO 0-2
        m = zero_memory_per_rank(per_rank, ranks // tensor, stage)
        cells = "".join(f"{_gib(m[k]):>16}" for k in ("weights", "grads", "optimizer", "total"))
        lines.append(f"  {stage:<6}{cells}")
    act = activation_memory_per_rank(cfg, seq, micro_batch, sequence, tensor)
    lines += [
        f"activation memory per rank, 16-bit, micro-batch {micro_batch} of seq {seq}, {seq // sequence} positions "
        "per rank (Korthikanti et al. 2022, eq. 2-3, divided by the sequence size):",
        f"  eager attention (scores stored){_gib(act['eager']):>20}",
        f"  fused attention (flash){_gib(act['fused']):>28}",
        f"  fused + activation checkpointing{_gib(act['checkpointed']):>19}",
    ]
    return "\n".join(lines)
