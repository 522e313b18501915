"""`llm bench kernels`: every fused op per backend, shape, dtype and pass, side by side.

Each row gives the time, the achieved rate (GB/s for the memory-bound norms, TFLOP/s
for attention and the fused loss), that rate as a percent of the card's ceiling
measured in the same run (copy bandwidth, bf16 matmul rate), the speed-up over torch
and over the best-known peer (flash_attn for attention, apex for the norms), and the
peak memory of one call above its inputs. On a CPU only the torch backends run, at
small shapes, and the rest are listed with the reason they need a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llm import kernels
from llm.bench.common import device, environment, format_table, median, synchronize, time_fn, write_results
from llm.kernels import dispatch

PEERS = {"attention": "flash_attn", "layer_norm": "apex", "rms_norm": "apex"}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# What the issue asks of the GPU runs (checked and printed when a GPU is present).
TARGETS = """\
norms fwd+bwd at hidden 4096-8192: >= 80% of copy bandwidth and >= 1.5x torch
attention seq 4096 hd 128 causal: fwd >= 1.0x torch and >= 60% of the matmul rate; fwd+bwd >= 0.9x torch
cross-entropy at vocab 128k: peak memory <= 1/4 of torch's"""


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], tuple[list[torch.Tensor | None], dict]]  # -> (tensor args, keyword args)
    bytes_fwd: float = 0.0  # memory traffic of the forward pass (norms)
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")


def _randn(*shape, dtype, dev, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).to(dtype)


def norm_case(op: str, rows: int, hidden: int, dtype: torch.dtype, dev) -> Case:
    def make():
        params = [_randn(hidden, dtype=dtype, dev=dev)] + (
            [_randn(hidden, dtype=dtype, dev=dev)] if op == "layer_norm" else []
        )
        return [_randn(rows, hidden, dtype=dtype, dev=dev), *params], {}

    size = rows * hidden * dtype.itemsize
    # forward reads x and writes y; backward reads x and dy and writes dx.
    return Case(op, f"{rows}x{hidden}", dtype, make, bytes_fwd=2 * size, bytes_bwd=3 * size)


def attention_case(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, dev, causal=True) -> Case:
    def make():
        q, k, v = (_randn(batch, heads, seq, head_dim, dtype=dtype, dev=dev) for _ in range(3))
        return [q, k, v], {"causal": causal}

    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    label = f"b{batch} h{heads} s{seq} d{head_dim}{' causal' if causal else ''}"
    # backward: five matmuls of the forward's two (dv, dp, ds->dq, ds->dk, and the recomputed p)
    return Case("attention", label, dtype, make, flops_fwd=flops, flops_bwd=2.5 * flops)


def cross_entropy_case(rows: int, dim: int, vocab: int, dtype: torch.dtype, dev) -> Case:
    def make():
        labels = torch.randint(0, vocab, (rows,), device=dev)
        labels[::17] = -100
        return [_randn(rows, dim, dtype=dtype, dev=dev), _randn(vocab, dim, dtype=dtype, dev=dev, scale=dim**-0.5)], {
            "labels": labels
        }

    flops = 2 * rows * dim * vocab
    return Case(
        "linear_cross_entropy",
        f"n{rows} d{dim} v{vocab}",
        dtype,
        make,
        flops_fwd=flops,
        flops_bwd=2 * flops,
        passes=("fwd+bwd",),
    )


def gpu_cases(dev) -> list[Case]:
    bf16 = torch.bfloat16
    return [
        norm_case("layer_norm", 16384, 4096, bf16, dev),
        norm_case("layer_norm", 16384, 8192, bf16, dev),
        norm_case("rms_norm", 16384, 4096, bf16, dev),
        norm_case("rms_norm", 16384, 8192, bf16, dev),
        attention_case(4, 32, 4096, 128, bf16, dev),
        cross_entropy_case(8192, 4096, 128256, bf16, dev),
    ]


def small_cases(dev, dtype=torch.float32) -> list[Case]:
    """CPU (or a quick GPU check): the same ops at shapes that take milliseconds."""
    return [
        norm_case("layer_norm", 512, 1024, dtype, dev),
        norm_case("rms_norm", 512, 1024, dtype, dev),
        attention_case(1, 4, 256, 64, dtype, dev),
        cross_entropy_case(256, 128, 8192, dtype, dev),
    ]


def _call(op: str, backend: str, args: list, kw: dict):
    fn = getattr(kernels, op)
    if op == "linear_cross_entropy":
        return fn(args[0], args[1], kw["labels"], backend=backend)
    if op == "attention":
        return fn(*args, causal=kw["causal"], backend=backend)
    if op == "layer_norm":
        return fn(args[0], args[1], args[2], 1e-5, backend=backend)
    return fn(args[0], args[1], 1e-6, backend=backend)


def _runner(case: Case, backend: str, pass_: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one call of the op, a function that drops the gradients the last call left)."""
    args, kw = case.make()
    if pass_ == "fwd":
        return (lambda: _call(case.op, backend, args, kw)), (lambda: None)
    leaves = [a.requires_grad_() for a in args if a is not None]
    grad = torch.randn_like(_call(case.op, backend, args, kw))

    def drop_grads():
        for leaf in leaves:
            leaf.grad = None

    def step():
        drop_grads()
        _call(case.op, backend, args, kw).backward(grad)

    return step, drop_grads


def _peak_memory_mb(case: Case, backend: str, pass_: str) -> float | None:
    """Memory one call allocates above its inputs, in MiB (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    step, drop_grads = _runner(case, backend, pass_)
    step()  # the first call compiles
    drop_grads()
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(dev: torch.device) -> dict:
    """The card's copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s), measured now."""
    on_gpu = dev.type == "cuda"
    n = (1 << 29) if on_gpu else (1 << 24)  # bytes copied
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_s = median(time_fn(lambda: dst.copy_(src), warmup=3, repeat=20))
    size = 8192 if on_gpu else 512
    mm_dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(size, size, device=dev).to(mm_dtype)
    b = torch.randn(size, size, device=dev).to(mm_dtype)
    mm_s = median(time_fn(lambda: a @ b, warmup=3, repeat=20))
    return {
        "copy_gbps": 2 * n / copy_s / 1e9,
        "matmul_tflops": 2 * size**3 / mm_s / 1e12,
        "matmul_dtype": DTYPE_NAMES[mm_dtype],
        "matmul_size": size,
    }


def run(ops: list[str] | None = None, quick: bool = False, repeat: int = 10) -> tuple[list[dict], dict, dict]:
    """Rows of measurements, the ceilings, and {op: {backend: reason}} for those not run."""
    dev = device()
    on_gpu = dev.type == "cuda"
    cases = gpu_cases(dev) if on_gpu and not quick else small_cases(dev, torch.bfloat16 if on_gpu else torch.float32)
    cases = [c for c in cases if ops is None or c.op in ops]
    ceilings = measure_ceilings(dev)
    not_run: dict[str, dict[str, str]] = {}
    rows: list[dict] = []
    for case in cases:
        args, kw = case.make()
        call = {"x": args[0]} if "norm" in case.op else {}
        if case.op == "attention":
            call = {"q": args[0], "k": args[1], "v": args[2], "causal": kw["causal"]}
        backends = []
        for name in dispatch.BACKENDS:
            if (case.op, name) not in dispatch.IMPLEMENTATIONS:
                continue
            if on_gpu:
                reason = dispatch.why_not(case.op, name, "cuda", **call)
            elif name != "torch":
                on_a_gpu = dispatch.why_not(case.op, name, "cuda", **call)
                reason = "needs a GPU" + (f"; there too: {on_a_gpu}" if on_a_gpu else "")
            else:
                reason = None
            if reason:
                not_run.setdefault(case.op, {})[name] = reason
            else:
                backends.append(name)
        del args, kw
        for pass_ in case.passes:
            results = {}
            for name in backends:
                try:
                    seconds = median(time_fn(_runner(case, name, pass_)[0], warmup=3, repeat=repeat))
                except Exception as e:  # a backend that fails at a shape is reported, not fatal
                    not_run.setdefault(case.op, {})[name] = f"failed at {case.shape} {pass_}: {e}"
                    continue
                results[name] = (seconds, _peak_memory_mb(case, name, pass_))
            rows += _rows(case, pass_, results, ceilings, dev.type)
    return rows, ceilings, not_run


def _rows(case: Case, pass_: str, results: dict, ceilings: dict, device_type: str) -> list[dict]:
    rows = []
    torch_time, torch_mem = results.get("torch", (None, None))
    peer = PEERS.get(case.op)
    peer_time = results.get(peer, (None, None))[0] if peer else None
    for name, (seconds, mem) in results.items():
        if case.bytes_fwd:
            amount = case.bytes_fwd + (case.bytes_bwd if pass_ == "fwd+bwd" else 0)
            rate, unit = amount / seconds / 1e9, "GB/s"
            pct = 100 * rate / ceilings["copy_gbps"]
        else:
            amount = case.flops_fwd + (case.flops_bwd if pass_ == "fwd+bwd" else 0)
            rate, unit = amount / seconds / 1e12, "TFLOP/s"
            pct = 100 * rate / ceilings["matmul_tflops"]
        rows.append(
            {
                "op": case.op,
                "backend": name,
                "pass": pass_,
                "shape": case.shape,
                "dtype": DTYPE_NAMES[case.dtype],
                "device": device_type,
                "time_ms": seconds * 1e3,
                "rate": rate,
                "unit": unit,
                "pct_of_ceiling": pct,
                "vs_torch": torch_time / seconds if torch_time else None,
                "vs_peer": peer_time / seconds if peer_time and name != peer else None,
                "peak_mem_mb": mem,
                "mem_vs_torch": mem / torch_mem if mem is not None and torch_mem else None,
            }
        )
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's GPU targets, each with what was measured and whether it was met."""

    def find(op, backend, pass_):
        return [
            r
            for r in rows
            if r["op"] == op and r["backend"] == backend and r["pass"] == pass_ and r["device"] == "cuda"
        ]

    checks = []
    for op in ("layer_norm", "rms_norm"):
        for backend in ("triton", "cuda"):
            for r in find(op, backend, "fwd+bwd"):
                met = r["pct_of_ceiling"] >= 80 and (r["vs_torch"] or 0) >= 1.5
                checks.append(
                    {
                        "target": f"{op} {backend} {r['shape']} fwd+bwd >=80% copy BW, >=1.5x torch",
                        "measured": f"{r['pct_of_ceiling']:.0f}%, {r['vs_torch'] or 0:.2f}x",
                        "met": met,
                    }
                )
    for r in find("attention", "triton", "fwd"):
        met = (r["vs_torch"] or 0) >= 1.0 and r["pct_of_ceiling"] >= 60
        checks.append(
            {
                "target": f"attention triton {r['shape']} fwd >=1.0x torch, >=60% matmul",
                "measured": f"{r['vs_torch'] or 0:.2f}x, {r['pct_of_ceiling']:.0f}%",
                "met": met,
            }
        )
    for r in find("attention", "triton", "fwd+bwd"):
        checks.append(
            {
                "target": f"attention triton {r['shape']} fwd+bwd >=0.9x torch",
                "measured": f"{r['vs_torch'] or 0:.2f}x",
                "met": (r["vs_torch"] or 0) >= 0.9,
            }
        )
    for r in find("linear_cross_entropy", "triton", "fwd+bwd"):
        ratio = r["mem_vs_torch"]
        checks.append(
            {
                "target": f"cross-entropy triton {r['shape']} peak memory <= 1/4 torch",
                "measured": "n/a" if ratio is None else f"{ratio:.3f}x",
                "met": ratio is not None and ratio <= 0.25,
            }
        )
    return checks


def plot(rows: list[dict], path: Path) -> Path | None:
    """Bars of speed-up over torch per case (or time, where torch is alone)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    multi = any(r["backend"] != "torch" for r in rows)
    labels = [f"{r['op']} {r['backend']}\n{r['shape']} {r['dtype']} {r['pass']}" for r in rows]
    values = [(r["vs_torch"] or 0) if multi else r["time_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 5))
    ax.bar(range(len(rows)), values, color=["tab:gray" if r["backend"] == "torch" else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over torch" if multi else "time (ms)")
    if multi:
        ax.axhline(1.0, color="black", linewidth=0.8)
    env = environment()
    ax.set_title(f"llm bench kernels on {env['gpu'] or env['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [
    "op",
    "backend",
    "pass",
    "shape",
    "dtype",
    "time_ms",
    "rate",
    "unit",
    "pct_of_ceiling",
    "vs_torch",
    "vs_peer",
    "peak_mem_mb",
    "mem_vs_torch",
]


HEADERS = {
    "time_ms": "time (ms)",
    "pct_of_ceiling": "% of ceiling",
    "vs_torch": "vs torch (x)",
    "vs_peer": "vs peer (x)",
    "peak_mem_mb": "peak mem (MB)",
    "mem_vs_torch": "mem vs torch (x)",
}
NOTES = {
    "rate": "norms: bytes the op must move (forward: read x, write y = 2 x size; backward adds 3 x size) / time, "
    "in GB/s; attention and cross-entropy: model FLOPs / time, in TFLOP/s (the unit column)",
    "pct_of_ceiling": "rate / this machine's ceiling measured at start: the copy bandwidth of a large tensor copy "
    "for norms (GB/s), the matmul rate for attention and cross-entropy (TFLOP/s). Over 100 means the shape "
    "fits in cache, which the copy ceiling (a 16 MiB copy on a CPU, 512 MiB on a GPU) does not: on a CPU the "
    "small norm shapes run from L2/L3 and pass the DRAM copy rate",
    "vs_torch": "time of the torch backend / time of this backend (above 1: faster than torch)",
    "vs_peer": "time of the peer library (flash_attn, apex) / time of this backend",
    "mem_vs_torch": "peak memory of this backend / peak memory of the torch backend (GPU only)",
}


def main(*, ops: list[str] | None, quick: bool, repeat: int, out_dir: str | None) -> Path:
    """Run, print and write the suite (`llm bench kernels`, llm.run.bench.kernels)."""
    rows, ceilings, not_run = run(ops, quick, repeat)
    print(
        f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
        f"{ceilings['matmul_tflops']:.2f} TFLOP/s"
    )
    print(format_table(rows, COLUMNS, HEADERS, NOTES))
    for op, reasons in not_run.items():
        for backend, reason in reasons.items():
            print(f"not run: {op} {backend}: {reason}")
    targets = check_targets(rows)
    if targets:
        print(format_table(targets))
    elif not torch.cuda.is_available():
        print("targets (need a GPU):\n" + TARGETS)
    path = write_results("kernels", rows, out_dir, ceilings=ceilings, not_run=not_run, targets=targets)
    png = plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path
