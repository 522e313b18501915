"""`llm bench ...`: the benchmark suites of llm.bench; each prints a table and writes JSON and a PNG
under --out, $OUT or benchmarks/results/."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def kernels(
    *,
    ops: list[Literal["attention", "layer_norm", "rms_norm", "linear_cross_entropy"]] | None = None,
    quick: bool = False,
    repeat: int = 10,
    out: str | None = None,
) -> Path:
    """Fused kernels against torch and peers.

    Time every kernel backend per op, shape, dtype and pass; report GB/s or TFLOP/s, percent of the
    card's measured copy bandwidth / matmul rate, speed-up over torch and peers, peak memory. On a
    CPU only torch runs (small shapes).

    Args:
        ops: the ops to time (default: all)
        quick: small shapes also on a GPU (a smoke run)
        repeat: timed calls per measurement (the median is reported)
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench kernels
        llm bench kernels --ops rms_norm layer_norm --out /tmp/results
    """
    from llm.bench import kernels as suite

    return suite.main(ops=ops, quick=quick, repeat=repeat, out_dir=out)


def train(
    *,
    models: tuple[str, ...] = ("gpt2-tiny", "llama-tiny", "gpt2-124m"),
    stages: tuple[Literal[0, 1, 2, 3], ...] = (0, 1, 2, 3),
    ranks: int = 2,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    seq_len: int = 256,
    micro_batch: int = 2,
    warmup: int = 2,
    steps: int = 5,
    modes: tuple[Literal["eager", "compiled"], ...] = ("eager", "compiled"),
    out: str | None = None,
) -> Path:
    """Training tokens/s and MFU per model size and ZeRO stage on local ranks (table, JSON, PNG).

    Args:
        models: model presets
        stages: ZeRO stages
        ranks: local processes
        precision: training precision
        seq_len: tokens per sequence
        micro_batch: sequences per rank per step
        warmup: untimed steps
        steps: timed steps; the median is reported
        modes: eager and/or train.compile, side by side (compiling takes minutes on a CPU)
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench train --models gpt2-tiny llama-tiny --stages 0 1 2 3 --ranks 2
    """
    from llm.bench import train as suite

    return suite.run(models=models, stages=stages, ranks=ranks, precision=precision, seq_len=seq_len,
                     micro_batch=micro_batch, warmup=warmup, steps=steps, modes=modes, out_dir=out)  # fmt: skip


def memory(
    *,
    model: str = "gpt2-tiny",
    stages: tuple[Literal[0, 1, 2, 3], ...] = (0, 1, 2, 3),
    ranks: tuple[int, ...] = (2, 4),
    precision: Literal["fp32", "bf16", "fp16"] = "bf16",
    seq_len: int = 64,
    out: str | None = None,
) -> Path:
    """Measured per-rank bytes of weights, gradients and optimizer state under ZeRO 0-3 against the
    analytic 16 bytes/param (table, JSON, PNG).

    Args:
        model: a model preset
        stages: ZeRO stages
        ranks: rank counts
        precision: training precision
        seq_len: tokens per sequence
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench memory --model gpt2-tiny --ranks 2 4 --precision bf16
    """
    from llm.bench import memory as suite

    return suite.run(model=model, stages=stages, ranks_list=ranks, precision=precision, seq_len=seq_len,
                      out_dir=out)  # fmt: skip


def sequence(
    *,
    model: str = "llama-tiny",
    set: list[str] | None = None,
    sequences: tuple[int, ...] = (1, 2, 4),
    first_seq_len: int = 1024,
    max_seq_len: int = 65536,
    budget_mib: float = 256.0,
    png: bool = False,
    out: str | None = None,
) -> Path:
    """Peak memory per rank against sequence length under sequence parallelism (parallel.sequence), and the
    longest sequence each size fits in a memory budget (table, JSON; --png draws it).

    Args:
        model: a model preset (its heads and key/value heads must divide by every size)
        set: model fields, KEY=VALUE (default: n_heads=8 n_kv_heads=4, which llama-tiny needs for size 4)
        sequences: sequence-parallel sizes, each run on that many local ranks (one per GPU on a GPU)
        first_seq_len: the first length; each size doubles it until a step passes the budget
        max_seq_len: the longest length tried
        budget_mib: the step's memory per rank (its peak less what the rank held before it) that must fit
        png: also draw the curves
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench sequence --sequences 1 2 4 --budget-mib 256
    """
    from llm.bench import sequence as suite
    from llm.config import apply_overrides

    fields = apply_overrides({}, list(set) if set is not None else ["n_heads=8", "n_kv_heads=4"])
    return suite.run(model=model, fields=fields, sequences=list(sequences), first_seq_len=first_seq_len,
                     max_seq_len=max_seq_len, budget_mib=budget_mib, png=png, out_dir=out)  # fmt: skip


def data(
    *,
    stdlib_bytes: int = 20_000_000,
    batches: int = 200,
    tokenize_rounds: int = 3,
    png: bool = False,
    out: str | None = None,
) -> Path:
    """Causal-LM batch assembly (32 x 2048) from shards vs a numpy-memmap loader, and prepare's MB/s vs
    the tokenizer's own encode_batch.

    Args:
        stdlib_bytes: standard library text to tokenize
        batches: batches timed per loader
        tokenize_rounds: alternating prepare / encode_batch rounds
        png: also draw a PNG
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench data --png
    """
    from llm.bench import data as suite

    return suite.run(stdlib_bytes=stdlib_bytes, batches=batches, tokenize_rounds=tokenize_rounds, png=png, out_dir=out)


def decode(
    *,
    model: str = "gpt2-124m",
    prompt_tokens: int = 16,
    new_tokens: int = 96,
    rounds: int = 3,
    out: str | None = None,
) -> Path:
    """Greedy decode tokens/s at batch 1 of llm fp32, int8, int4, pruned and a student against the bandwidth
    limit and the installed peers (transformers, llama.cpp GGUF), interleaved (table, JSON, PNG).

    Args:
        model: a model preset (random weights) or any model path
        prompt_tokens: prompt length
        new_tokens: generated tokens per run (the whole generate call is timed)
        rounds: interleaved timed rounds after a warm-up round; the median is reported
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench decode --model gpt2-124m --rounds 3
    """
    from llm.bench import inference

    path = inference.decode(model, prompt_tokens, new_tokens, rounds, out)
    print(inference.report(path))
    return path


def classify(
    *,
    model: str = "bert-base",
    batch: int = 32,
    seq_len: int = 64,
    rounds: int = 3,
    out: str | None = None,
) -> Path:
    """Classifier forward examples/s of llm fp32, int8-dynamic, int8, int4, pruned and a student against the
    installed peers (transformers, ONNX Runtime int8), interleaved (table, JSON, PNG).

    Args:
        model: a text classifier path, or a preset (random weights, mean pooling)
        batch: examples per forward
        seq_len: tokens per example
        rounds: interleaved timed rounds after a warm-up round; the median is reported
        out: results folder (default: $OUT or benchmarks/results/)

    Example:
        llm bench classify --model bert-tiny --rounds 2
    """
    from llm.bench import inference

    path = inference.classify(model, batch, seq_len, rounds, out)
    print(inference.report(path))
    return path
