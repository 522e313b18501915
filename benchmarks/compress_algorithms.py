"""Calibrated compression against its baselines, on the same trained model and held-out data, in one run:
int4 (group 128) quantization by GPTQ and AWQ against round-to-nearest (RTN), and SparseGPT against Wanda and
magnitude pruning at 50% and at 2:4. A language model (perplexity; the README quickstart's by default, --lm
for another, e.g. a GPT-2 124M-shape one) and a fine-tuned MiniLM classifier (held-out loss and accuracy;
--classifier). Every variant is made by the `llm compress` functions
from the same calibration batches (--calibration-batches of --batch-size from the training data) and measured
by `llm compress report`.

Goals (issue 25): the quality loss of GPTQ and of AWQ each at most half of RTN's; SparseGPT's below both Wanda's
and magnitude's at the same pattern. The loss is the perplexity increase for the language model and the held-out
loss increase for the classifier (accuracy moves by whole examples: reported, not judged).

    PYTHONPATH=. python benchmarks/compress_algorithms.py                       # runs/quickstart/export
    PYTHONPATH=. python benchmarks/compress_algorithms.py --lm runs/gpt2-124m-ctx64 --lm-data /tmp/p2/data \
        --lm-name gpt2-124m --calibration-batches 6 --eval-batches 8 --variants rtn gptq
    PYTHONPATH=. python benchmarks/compress_algorithms.py --classifier runs/minilm/export \\
        --classifier-train runs/minilm/train.jsonl --classifier-val runs/minilm/val.jsonl --val-limit 1000

Writes the variants under --work (default runs/compress_algorithms), each model's report under
benchmarks/results/compress_algorithms/<model>/, and one JSON of every figure and check under
benchmarks/results/compress_algorithms-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm.compress import report  # noqa: E402
from llm.compress.quantized import QuantizedLinear  # noqa: E402
from llm.fileio import write_atomic  # noqa: E402
from llm.run.compress import compress_report, prune_model, quantize_model, shard_config  # noqa: E402
from llm.run.evaluate import evaluate  # noqa: E402
from llm.run.loader import load_model  # noqa: E402

QUANTIZED = ("rtn", "gptq", "awq")
PRUNED = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}


def variants(model: Path, work: Path, calibration: dict, reuse: bool, chosen: list[str]) -> dict[str, Path]:
    """The `chosen` variants of `model`, by name: int4 g128 by each algorithm, each pruning method at 50% and
    2:4; `reuse`: those already under `work` are kept."""
    made = {}
    for algorithm in (a for a in QUANTIZED if a in chosen):
        out = made[f"int4 g128 {algorithm}"] = work / f"int4-g128-{algorithm}"
        extra = calibration if algorithm != "rtn" else {}
        if not (reuse and (out / "model.safetensors").is_file()):
            quantize_model(str(model), str(out), method="int4", group_size=128, algorithm=algorithm, **extra)
    for label, how in PATTERNS.items():
        for method in (m for m in PRUNED if m in chosen):
            out = made[f"{method} {label}"] = work / f"{method}-{label.replace('%', '').replace(':', 'of')}"
            extra = calibration if method != "magnitude" else {}
            if not (reuse and (out / "model.safetensors").is_file()):
                prune_model(str(model), str(out), method=method, **how, **extra)
    return made


@torch.no_grad()
def blocks_only(original: Path, variant: Path, val: str, work: Path, batch_size: int, max_batches: int | None) -> dict:
    """Held-out metrics of the original with the variant's blocks (quantized weights dequantized, AWQ's folded
    norms too) and its own float embeddings and head: the blocks' share of a quantized variant's loss (the
    embeddings and the head are rounded to nearest by every algorithm)."""
    m, v = load_model(original).eval(), load_model(variant)
    for key, tensor in m.state_dict().items():
        if key.startswith("transformer.blocks."):
            owner, _, leaf = key.rpartition(".")
            module = v.get_submodule(owner)
            quantized = isinstance(module, QuantizedLinear) and leaf == "weight"
            tensor.copy_(module.weight.dequantize() if quantized else getattr(module, leaf))
    config = shard_config(m, val, str(original))
    return evaluate(
        m, config, batch_size=batch_size, max_batches=max_batches, out=work / "confusion-blocks-only", name=str(variant)
    )


def at_most_half(increase: float, rtn: float) -> bool | None:
    """The goal "at most half of RTN's increase"; None (not measurable) where RTN did not increase it."""
    return increase <= rtn / 2 if rtn > 0 else None


def measure(name: str, model: Path, train: str, val: str, work: Path, args) -> dict:
    """Make the variants of one model, report them, and judge the goals on `key` (ppl or loss)."""
    calibration = {"data": train, "calibration_batches": args.calibration_batches, "batch_size": args.batch_size}
    started = time.perf_counter()
    made = variants(model, work / name, calibration, args.reuse, args.variants)
    made_s = time.perf_counter() - started
    result = compress_report(
        str(model), [str(p) for p in made.values()], data=val, out=str(args.results / name),
        names=["original", *made], new_tokens=32, rounds=args.rounds, batch_size=args.eval_batch_size,
        max_batches=args.eval_batches,
    )  # fmt: skip
    rows = {r["name"]: r for r in result["rows"]}
    key = "ppl" if "ppl" in rows["original"]["metrics"] else "loss"
    base = rows["original"]["metrics"][key]
    quality = {n: r["metrics"] for n, r in rows.items()}
    increase = {n: m[key] - base for n, m in quality.items()}
    checks, blocks_checks, blocks, blocks_increase = {}, {}, {}, {}
    quantized = [a for a in QUANTIZED if a in args.variants]
    blocks = {
        f"int4 g128 {a}": blocks_only(
            model, made[f"int4 g128 {a}"], val, work / name, args.eval_batch_size, args.eval_batches
        )
        for a in quantized
    }
    blocks_increase = {n: m[key] - base for n, m in blocks.items()}
    checks, blocks_checks = {}, {}
    for a in (a for a in ("gptq", "awq") if a in quantized and "rtn" in quantized):
        checks[f"{a} int4 g128 {key} increase <= half of RTN's"] = at_most_half(
            increase[f"int4 g128 {a}"], increase["int4 g128 rtn"]
        )
        blocks_checks[f"{a} blocks' {key} increase <= half of RTN's"] = at_most_half(
            blocks_increase[f"int4 g128 {a}"], blocks_increase["int4 g128 rtn"]
        )
    for label in PATTERNS if "sparsegpt" in args.variants else ():
        sparse = quality[f"sparsegpt {label}"][key]
        for method in (m for m in ("wanda", "magnitude") if m in args.variants):
            checks[f"sparsegpt {label} {key} < {method} {label}"] = sparse < quality[f"{method} {label}"][key]
    return {
        "model": str(model),
        "calibration": {"data": train, "batches": args.calibration_batches, "batch_size": args.batch_size},
        "held_out": val,
        "eval_batches": args.eval_batches,
        "eval_batch_size": args.eval_batch_size,
        "quality_key": key,
        "metrics": quality,
        f"{key}_increase": increase,
        "blocks_only_metrics": blocks,
        f"blocks_only_{key}_increase": blocks_increase,
        "blocks_only_checks": blocks_checks,
        "variants_made_s": made_s,
        "report": {k: result[k] for k in ("table", "json", "png")},
        "checks": checks,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lm", type=Path, default=Path("runs/quickstart/export"), help="a language model; skipped when absent"
    )
    p.add_argument("--lm-data", default="data/quickstart", help="its train/ and val/ shard directories")
    p.add_argument("--lm-name", default="quickstart", help="its name in the results")
    p.add_argument("--classifier", type=Path, help="a fine-tuned classifier's model directory")
    p.add_argument("--classifier-train", help="its training JSONL (calibration)")
    p.add_argument("--classifier-val", help="its held-out JSONL")
    p.add_argument("--val-limit", type=int, help="classifier: score the first N held-out examples")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-batches", type=int, help="held-out batches scored (default: all)")
    p.add_argument("--variants", nargs="+", choices=QUANTIZED + PRUNED, default=QUANTIZED + PRUNED, help="to make")
    p.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds of the report")
    p.add_argument("--work", type=Path, default=Path("runs/compress_algorithms"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/compress_algorithms"))
    p.add_argument("--reuse", action="store_true", help="keep the variants already under --work")
    args = p.parse_args()
    started = time.strftime("%Y%m%dT%H%M%S")
    models = {}
    if args.lm.is_dir():
        data = Path(args.lm_data)
        models[args.lm_name] = measure(args.lm_name, args.lm, str(data / "train"), str(data / "val"), args.work,
                                       args)  # fmt: skip
    if args.classifier:
        val = args.classifier_val
        if args.val_limit:
            lines = [line for line in Path(val).read_text(encoding="utf-8").splitlines() if line.strip()]
            val = args.work / f"val-first{args.val_limit}.jsonl"
            write_atomic(val, "\n".join(lines[: args.val_limit]) + "\n")
        models["classifier"] = measure("classifier", args.classifier, args.classifier_train, str(val), args.work,
                                       args)  # fmt: skip
    out = Path("benchmarks/results") / f"compress_algorithms-{started}.json"
    payload = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "environment": report.environment(),
        "llmcompressor": "compared in its own venv by benchmarks/gptq_vs_llmcompressor.py (llmcompressor 0.14.0.1 "
        "pins transformers 5.17 and compressed-tensors 0.19.0, below this venv's)",
        "models": models,
    }
    write_atomic(out, json.dumps(payload, indent=2) + "\n")
    for name, m in models.items():
        increase = m[f"{m['quality_key']}_increase"]
        print(f"{name}: {m['quality_key']} increase " + ", ".join(f"{k} {v:+.4f}" for k, v in increase.items()))
        increase = m[f"blocks_only_{m['quality_key']}_increase"]
        print(f"{name}: blocks only " + ", ".join(f"{k} {v:+.4f}" for k, v in increase.items()))
        print(json.dumps({**m["checks"], **m["blocks_only_checks"]}, indent=2))
    print(f"wrote {out}")
    return 0 if all(all(v is not False for v in m["checks"].values()) for m in models.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
