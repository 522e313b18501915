"""Peak memory of layer-by-layer GPTQ calibration (llm.compress.calibrate) on a model shape, random weights (memory
does not depend on the values), against the analytic figure: the float32 weights, the calibration hidden states
at one block's input (tokens x d_model x 4 bytes), the block's float64 statistics (sum of K^2 + K per Linear x 8
bytes), the integers GPTQ keeps until the model is quantized (1 byte per block weight, plus the scales), and the
larger of one block's forward on one batch and the widest layer's solve (24 K^2 bytes).

    PYTHONPATH=. python benchmarks/calibration_memory.py [--model gpt2-355m] [--layers N] [--batches 4] [--batch-size 1]

Each block adds only its weights and GPTQ's integers for it (the other terms are one block's, freed before the
next), so --layers measures the per-block terms on a busy CPU in minutes; the whole shape's are then analytic.

Prints and writes calibration_memory-<time>.json under benchmarks/results/: the resident set (VmRSS) and its peak
(VmHWM, restarted between phases) of the imports, the model's build, the calibration (calibrate.calibrate with
GPTQ's solves) and the `quantize` transform after it, and each analytic term.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.compress import calibrate, gptq, report  # noqa: E402
from llm.compress.quantized import QuantizedLinear, QuantizedWeight  # noqa: E402
from llm.config import with_base  # noqa: E402
from llm.fileio import write_atomic  # noqa: E402
from llm.tasks import build_model  # noqa: E402

MB = 2**20


def rss() -> tuple[int, int]:
    """Bytes: (resident set now, its peak since the last `reset_peak`) from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    """Restart the peak at the current resident set (Linux: 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def calibration_peak(phases: dict) -> None:
    """Record the peak of `calibrate.calibrate` alone (the blocks' calibration, GPTQ's solves) in `phases`, apart
    from the `quantize` transform that follows it in gptq.quantize_model: the module's function is wrapped."""
    calibrate_blocks = calibrate.calibrate

    def measured(*args, **kwargs):
        reset_peak()
        phases["before_calibration"] = rss()[0]
        calibrate_blocks(*args, **kwargs)
        phases["calibration_peak"] = rss()[1]
        reset_peak()
        phases["before_transform"] = rss()[0]

    calibrate.calibrate = measured


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-355m")
    p.add_argument("--layers", type=int, help="build this many of the shape's blocks (default: all)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    phases = {"imports": rss()[1]}  # torch and llm, before any model
    torch.manual_seed(0)
    spec = with_base({"base": args.model, "max_seq_len": args.seq_len}, "models", "model")
    if args.layers:
        spec["n_layers"] = args.layers
    reset_peak()
    model = build_model(spec, {"name": "causal_lm"}).eval()
    phases["built"], phases["build_peak"] = rss()
    cfg = model.config
    batches = [
        {"input_ids": torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len))} for _ in range(args.batches)
    ]
    calibration_peak(phases)
    started = time.perf_counter()
    gptq.quantize_model(model, batches, "int4", args.group_size)
    seconds = time.perf_counter() - started
    phases["transform_peak"] = rss()[1]
    block = model.transformer.blocks[0]
    tokens = args.batches * args.batch_size * args.seq_len
    linears = [(m.weight.in_features, m.weight.out_features) for m in block.modules() if isinstance(m, QuantizedLinear)]
    block_weights = cfg.n_layers * sum(k * n for k, n in linears)
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.num_weights for m in model.modules() if isinstance(m, QuantizedWeight)
    )
    T, B, d, h = args.seq_len, args.batch_size, cfg.d_model, cfg.n_heads
    widest = max(k for k, _ in linears)
    analytic = {
        "weights_fp32": 4 * params,
        "hidden_states": 4 * tokens * d,
        "block_forward_one_batch": 4 * B * (T * T * h + 2 * T * cfg.d_ff + 6 * T * d),
        "block_statistics_fp64": 8 * sum(k * k + k for k, _ in linears),
        "gptq_integers_and_scales": block_weights + 2 * block_weights // args.group_size,
        # the widest layer's solve at its peak: its Hessian in float64; H, L, H^-1 and U in float32
        "gptq_solve_widest": (8 + 4 * 4) * widest * widest,
    }
    figures = {
        "model": args.model,
        "layers": cfg.n_layers,
        "parameters": params,
        "calibration_tokens": tokens,
        "rss_mb": {k: v / MB for k, v in phases.items()},
        "calibration_above_weights_mb": (phases["calibration_peak"] - phases["before_calibration"]) / MB,
        "analytic_mb": {k: v / MB for k, v in analytic.items()},
        # the statistics are held through the forward pass that gathers them and through the solves after it
        "analytic_calibration_above_weights_mb": (
            sum(analytic[k] for k in ("hidden_states", "block_statistics_fp64", "gptq_integers_and_scales"))
            + max(analytic["block_forward_one_batch"], analytic["gptq_solve_widest"])
        )
        / MB,
        "seconds": seconds,
    }
    out = Path("benchmarks/results") / f"calibration_memory-{time.strftime('%Y%m%dT%H%M%S')}.json"
    payload = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "environment": report.environment()}
    write_atomic(out, json.dumps({**payload, "figures": figures}, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
