"""Layer-level speed of the quantized linear ops on a CPU against fp32 F.linear, on one thread.

Decode is a GEMV (one row of x) per layer, bound by the weight bytes it reads, so the shapes are GPT-2 124M's
projections and head and those of the llama-1b preset (Llama 3.2 1B: GQA, fused SwiGLU, 128k vocabulary),
with one prefill row (128 rows of x). "memory": calls rotate over copies of the weight totalling at least
256 MiB, so each call reads its weight from DRAM, as a decode step of a model larger than the last-level
cache does; "cached": one weight, repeated (it stays in L2/L3). Methods run interleaved, call by call; the
figures are medians. GB/s counts the bytes of the weight as each method stores it (int4: packed nibbles
and fp32 scales).

int8-dynamic (activations quantized per token) is measured as a classifier's forward runs it: MiniLM's
projections on a batch of 32 x 64 tokens, beside FBGEMM's dynamic linear (per-tensor activations, with
reduce_range, as AVX2 without VNNI needs), the peer not taken (see llm/kernels/cpu_quant_linear.py); "err"
is ||y - y64|| / ||y64|| against the float64 product of x and the int8 weight, with x drawn with one
outlier channel, as BERT-style hidden states have. The machine may be shared: the load average is recorded
before and after.

    PYTHONPATH=. python benchmarks/quant_matmul.py
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm import kernels
from llm.bench.common import format_table, median, write_results
from llm.kernels import cpu_quant_linear

COLD_BYTES = 256 * 2**20
SECONDS_PER_CASE = 2.0
# (model, layer, K, N, rows of x)
SHAPES = [
    ("gpt2-124m", "attn qkv", 768, 2304, 1),
    ("gpt2-124m", "attn proj", 768, 768, 1),
    ("gpt2-124m", "mlp fc", 768, 3072, 1),
    ("gpt2-124m", "mlp proj", 3072, 768, 1),
    ("gpt2-124m", "lm head", 768, 50257, 1),
    ("gpt2-124m", "mlp fc prefill", 768, 3072, 128),
    ("llama-1b", "attn qkv (GQA)", 2048, 3072, 1),
    ("llama-1b", "attn proj", 2048, 2048, 1),
    ("llama-1b", "swiglu gate+up", 2048, 16384, 1),
    ("llama-1b", "swiglu down", 8192, 2048, 1),
    ("llama-1b", "lm head", 2048, 128256, 1),
]
METHODS = ("fp32", "int8", "int4 g32", "int4 g128")
# (model, layer, K, N, rows of x): a forward of 32 sequences of 64 tokens
DYNAMIC_SHAPES = [
    ("minilm-l6", "attn q/k/v/out", 384, 384, 2048),
    ("minilm-l6", "ffn in", 384, 1536, 2048),
    ("minilm-l6", "ffn out", 1536, 384, 2048),
]
DYNAMIC_METHODS = ("fp32", "int8-dynamic", "fbgemm (reduce_range)")


def make_weight(method: str, n: int, k: int) -> tuple:
    """The arguments after x of one freshly drawn (N, K) weight."""
    if method == "fp32":
        return (torch.randn(n, k),)
    if method == "int8":
        return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n)
    group = int(method.split("g")[-1])
    return torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // group), group


def weight_bytes(method: str, n: int, k: int) -> int:
    if method == "fp32":
        return 4 * n * k
    if method == "int8":
        return n * k + 4 * n
    return n * k // 2 + 4 * n * (k // int(method.split("g")[-1]))


def call(method: str, x: torch.Tensor, args: tuple) -> torch.Tensor:
    if method == "fp32":
        return F.linear(x, *args)
    return kernels.int8_linear(x, *args) if method == "int8" else kernels.int4_linear(x, *args)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, run in turn `repeat` times after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: median(t) for name, t in times.items()}


def measure(k: int, n: int, rows: int) -> dict[str, dict[str, float]]:
    x = torch.randn(rows, k)
    copies = {m: [make_weight(m, n, k) for _ in range(math.ceil(COLD_BYTES / weight_bytes(m, n, k)))] for m in METHODS}
    cycle = dict.fromkeys(METHODS, 0)

    def cold(method):
        def fn():
            cycle[method] = (cycle[method] + 1) % len(copies[method])
            call(method, x, copies[method][cycle[method]])

        return fn

    start = time.perf_counter()
    call("fp32", x, copies["fp32"][0])
    repeat = max(15, min(200, int(SECONDS_PER_CASE / (time.perf_counter() - start) / len(METHODS))))
    memory = interleaved({m: cold(m) for m in METHODS}, repeat)
    cached = interleaved({m: (lambda m=m: call(m, x, copies[m][0])) for m in METHODS}, repeat)
    return {m: {"memory": memory[m], "cached": cached[m], "bytes": weight_bytes(m, n, k)} for m in METHODS}


def measure_dynamic(k: int, n: int, rows: int) -> list[dict]:
    x = torch.randn(rows, k)
    x[:, 7] *= 20
    qweight, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01
    bias = torch.randn(n)
    w = qweight.float() * scale[:, None]
    with warnings.catch_warnings():  # quantize_per_channel: deprecated, the reason FBGEMM is not used
        warnings.simplefilter("ignore")
        packed = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8), bias
        )
    fns = {
        "fp32": lambda: F.linear(x, w, bias),
        "int8-dynamic": lambda: kernels.int8_dynamic_linear(x, qweight, scale, bias),
        "fbgemm (reduce_range)": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
    }
    exact = x.double() @ w.double().T + bias.double()
    seconds = interleaved(fns, 15)
    return [
        {
            "method": m,
            "ms": seconds[m] * 1e3,
            "x fp32": seconds["fp32"] / seconds[m],
            "err": ((fns[m]().double() - exact).norm() / exact.norm()).item(),
        }
        for m in DYNAMIC_METHODS
    ]


def copy_rate() -> float:
    """GB/s of a 256 MiB copy (bytes read + written), the machine's memory bandwidth on one thread."""
    a = torch.ones(COLD_BYTES // 4)
    b = torch.empty_like(a)
    seconds = interleaved({"copy": lambda: b.copy_(a)}, 5)["copy"]
    return 2 * a.nbytes / seconds / 1e9


def main() -> None:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    builds = [width for width, _ in cpu_quant_linear.libraries()[0]]
    if not builds:
        raise SystemExit(f"the CPU kernels cannot run here: {cpu_quant_linear.libraries()[1]}")
    bandwidth = copy_rate()
    rows = []
    for model, layer, k, n, m in SHAPES:
        result = measure(k, n, m)
        base = result["fp32"]
        for method, r in result.items():
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "shape": f"{m}x{k} @ {k}x{n}",
                    "method": method,
                    "us": r["memory"] * 1e6,
                    "GB/s": r["bytes"] / r["memory"] / 1e9,
                    "x fp32": base["memory"] / r["memory"],
                    "cached us": r["cached"] * 1e6,
                    "cached x fp32": base["cached"] / r["cached"],
                }
            )
        print(format_table(rows[-len(METHODS) :]), flush=True)
    dynamic = []
    for model, layer, k, n, m in DYNAMIC_SHAPES:
        for r in measure_dynamic(k, n, m):
            dynamic.append({"model": model, "layer": layer, "shape": f"{m}x{k} @ {k}x{n}", **r})
    load_after = os.getloadavg()
    print()
    print(format_table(rows, headers={"us": "us (memory)", "GB/s": "GB/s (memory)", "x fp32": "x fp32 (memory)"}))
    print()
    print(format_table(dynamic))
    print(
        f"one thread; copy rate {bandwidth:.1f} GB/s; kernel vector widths {builds}; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    path = write_results(
        "quant_matmul",
        rows,
        dynamic_rows=dynamic,
        copy_gbps=bandwidth,
        vector_widths=builds,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        load_average_before=load_before,
        load_average_after=load_after,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
