"""The compression figures of docs/compression.md on a fine-tuned text classifier (MiniLM sentiment).

Takes a classifier (an llm model directory, e.g. the export of benchmarks/finetune_sentiment.py) and
the train / held-out JSONL files it was fine-tuned and scored on, and measures on the held-out split,
against the original: int8, int8-dynamic and int4 (group 32) quantization; magnitude vs Wanda at 50%
unstructured sparsity; 25% of the heads and neurons removed, then a short `llm finetune` recovery;
a student of the teacher's first layers distilled by `llm distill` vs the same student trained alone
(`llm pretrain`, no teacher) for the same steps and data; and that quantized and pruned copies reload
with bit-identical outputs. Every variant is made by the `llm compress` functions and measured by
`llm compress report` (accuracy, size, parameters, CPU examples/s; table, JSON, PNG).

    PYTHONPATH=. python benchmarks/compress_classifier.py MODEL --train TRAIN.jsonl --val VAL.jsonl \\
        [--val-limit N] [--recovery-steps 150] [--distill-steps 150] [--work DIR] [--reuse]

Writes the variants and runs under --work (default runs/compress_classifier), the report under
benchmarks/results/compress_classifier/ and one JSON of every figure and check under
benchmarks/results/compress_classifier-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm import transforms  # noqa: E402
from llm.compress import prune, report  # noqa: E402
from llm.compress.distill import distillation_loss  # noqa: E402
from llm.fileio import write_atomic  # noqa: E402
from llm.run.compress import calibration_batches, compress_report, prune_model, quantize_model  # noqa: E402
from llm.run.loader import find_tokenizer, load_model  # noqa: E402

QUANTIZED = {"int8": "int8", "int8-dynamic": "int8-dynamic", "int4 g32": "int4"}
REUSE = False  # --reuse: keep variants and runs already under --work (after an interrupted run)


def made(out: Path) -> bool:
    return REUSE and (out / "model.safetensors").is_file()


def held_out(val: Path, limit: int | None, work: Path) -> Path:
    """The held-out file, or its first `limit` examples (the split is already shuffled) under `work`."""
    if not limit:
        return val
    lines = [line for line in val.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit >= len(lines):
        return val
    path = work / f"val-first{limit}.jsonl"
    write_atomic(path, "\n".join(lines[:limit]) + "\n")
    return path


def run_llm(command: str, recipe: dict, path: Path, *sets: str) -> Path:
    """`llm COMMAND path --resume none [--set ...]` in a subprocess; returns RUN_DIR/export.

    Each run gets its own MASTER_PORT, and DeepSpeed's CPU shared-memory allreduce buffer of that port
    (/dev/shm/deepspeed_allreduce_buffer_*_PORT_*, 66 MiB, which it leaves behind) is removed after."""
    run_dir = Path(recipe["run_dir"])
    for s in sets:
        if s.startswith("run_dir="):
            run_dir = Path(s.partition("=")[2])
    if REUSE and (run_dir / "export" / "model.safetensors").is_file():
        return run_dir / "export"
    write_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    port = 29500 + os.getpid() % 2000 + len(list(path.parent.glob("*.yaml")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port)}
    args = [sys.executable, "-m", "llm", command, str(path), "--resume", "none", *[f"--set={s}" for s in sets]]
    try:
        subprocess.run(args, env=env, cwd=ROOT, check=True)
    finally:
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    return run_dir / "export"


def common(model: Path, args, run_dir: Path, steps: int, lr: float) -> dict:
    """The recipe sections shared by the recovery and the distillation runs."""
    task = load_model(model).description()["task"]
    return {
        "task": task,  # the teacher's labels, in its order
        "data": {"train": str(args.train), "val": str(args.val), "seq_len": args.seq_len},
        "run_dir": str(run_dir),
        "seed": 0,
        "train": {
            "micro_batch_size": args.batch_size,
            "max_steps": steps,
            "precision": "fp32",
            "log_every": 25,
            "eval_every": 0,
            "eval_batches": 1,
        },
        "optim": {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.999]},
        "schedule": {"warmup_steps": max(1, steps // 10), "decay": "linear", "min_lr_ratio": 0.0},
        "deepspeed": {"preset": "zero0"},
        "checkpoint": {"keep_last": 1},
        "logging": {"tensorboard": False, "progress": False},
    }


def recover(pruned: Path, args) -> Path:
    """`llm finetune` of the structurally pruned model on the training file."""
    recipe = {
        "init_from": str(pruned),
        **common(args.model, args, args.work / "struct25-recovered", args.recovery_steps, args.lr),
    }
    return run_llm("finetune", recipe, args.work / "recover.yaml")


def distil(args) -> tuple[Path, Path]:
    """(distilled student, student alone): the teacher's architecture cut to its first
    `--student-layers` blocks, initialised from them (init_from loads the blocks that exist),
    trained with `llm distill` and, without the teacher, with `llm pretrain`; same steps, data, seed."""
    teacher = load_model(args.model)
    model = {**teacher.description()["model"], "n_layers": args.student_layers}
    tokenizer = find_tokenizer(args.model)
    recipe = {
        "model": model,
        "init_from": str(args.model),
        **common(args.model, args, args.work / "student-distilled", args.distill_steps, args.lr),
        "distill": {"teacher": str(args.model), "temperature": args.temperature, "alpha": args.alpha},
    }
    recipe["data"]["tokenizer"] = str(tokenizer)
    distilled = run_llm("distill", recipe, args.work / "distill.yaml")
    alone = run_llm(
        "pretrain", recipe, args.work / "alone.yaml", "distill.teacher=null", f"run_dir={args.work / 'student-alone'}"
    )
    return distilled, alone


@torch.no_grad()
def kl_to_teacher(teacher: Path, student: Path, val: Path, args) -> float:
    """Mean over held-out examples of KL(teacher || student) of the class distributions at T = 1, nats."""
    t_model, s_model = load_model(teacher).eval(), load_model(student).eval()
    batches = calibration_batches(t_model, val, str(teacher), args.batch_size, args.seq_len)
    total, count = 0.0, 0
    while (batch := batches.next_batch()) is not None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        t, s = t_model(**inputs).logits.double(), s_model(**inputs).logits.double()
        _, kl = distillation_loss(s, t, None, None, temperature=1.0, alpha=1.0)
        total += kl.item() * t.shape[0]
        count += t.shape[0]
    return total / count


@torch.no_grad()
def reload_checks(args, val: Path, variants: dict[str, Path]) -> dict[str, bool]:
    """Whether each saved variant, reloaded, gives bit-identical logits to the same compression
    applied to the original in memory, on the first held-out batch."""
    original = load_model(args.model).float().eval()
    batch = calibration_batches(original, val, str(args.model), args.batch_size, args.seq_len).next_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    checks = {}
    for name, method in QUANTIZED.items():
        m = load_model(args.model).float().eval()
        transforms.apply_transform(m, {"name": "quantize", "method": method, "group_size": 32}, "quantize")
        checks[f"{name} reloads bit-identical"] = torch.equal(
            m(**inputs).logits, load_model(variants[name]).eval()(**inputs).logits
        )
    m = load_model(args.model).float().eval()
    prune.prune_structured(m, *prune.parse_structured(args.structured))
    checks["structured -25% reloads bit-identical"] = torch.equal(
        m(**inputs).logits, load_model(variants["heads+neurons -25%"]).eval()(**inputs).logits
    )
    m = load_model(args.model).float().eval()
    prune.prune_unstructured(m, 0.5, "magnitude")
    checks["magnitude 50% reloads bit-identical"] = torch.equal(
        m(**inputs).logits, load_model(variants["magnitude 50%"]).eval()(**inputs).logits
    )
    return checks


def structured_spec(model: Path, fraction: float = 0.25) -> str:
    cfg = load_model(model).config
    return f"heads={round(cfg.kv_heads * fraction)},neurons={round(cfg.d_ff * fraction)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the fine-tuned classifier (llm model directory)")
    p.add_argument("--train", type=Path, required=True, help="training JSONL (Wanda calibration, recovery, students)")
    p.add_argument("--val", type=Path, required=True, help="held-out JSONL")
    p.add_argument("--val-limit", type=int, default=None, help="score on the first N held-out examples (default all)")
    p.add_argument("--work", type=Path, default=Path("runs/compress_classifier"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--recovery-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    p.add_argument("--eval-batch", type=int, default=8, help="evaluation batch, also the timed batch (default 8)")
    p.add_argument("--reuse", action="store_true", help="keep variants and runs already made under --work")
    args = p.parse_args()
    global REUSE
    REUSE = args.reuse
    args.model, args.train, args.val, args.work = (x.resolve() for x in (args.model, args.train, args.val, args.work))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%dT%H%M%S")
    clock = time.perf_counter()
    val = held_out(args.val, args.val_limit, args.work)
    args.structured = structured_spec(args.model)

    variants: dict[str, Path] = {}
    for name, method in QUANTIZED.items():
        variants[name] = args.work / method
        if not made(variants[name]):
            quantize_model(str(args.model), str(variants[name]), method=method, group_size=32)
    for method in ("magnitude", "wanda"):
        out = variants[f"{method} 50%"] = args.work / f"{method}50"
        if not made(out):
            prune_model(str(args.model), str(out), method=method, sparsity=0.5, data=str(args.train))
    if not made(args.work / "struct25"):
        prune_model(str(args.model), str(args.work / "struct25"), structured=args.structured)
    variants["heads+neurons -25%"] = args.work / "struct25"
    checks = reload_checks(args, val, variants)
    variants[f"-25% + {args.recovery_steps} steps"] = recover(args.work / "struct25", args)
    distilled, alone = distil(args)
    variants[f"{args.student_layers}-layer student, distilled"] = distilled
    variants[f"{args.student_layers}-layer student, alone"] = alone

    names = ["fp32 original", *variants]
    result = compress_report(
        str(args.model), [str(v) for v in variants.values()], str(val), str(args.out / "compress_classifier"),
        rounds=args.rounds, batch_size=args.eval_batch, names=names, seq_len=args.seq_len,
    )  # fmt: skip
    rows = {r["name"]: r for r in result["rows"]}
    base = rows["fp32 original"]
    acc = {n: r["metrics"]["accuracy"] for n, r in rows.items()}
    smaller = {n: base["size_bytes"] / r["size_bytes"] for n, r in rows.items()}
    d, a = f"{args.student_layers}-layer student, distilled", f"{args.student_layers}-layer student, alone"
    figures = {
        "held_out_examples": sum(sum(row) for row in base["metrics"]["confusion"]),
        "original_accuracy": acc["fp32 original"],
        "accuracy_change_points": {n: 100 * (acc[n] - acc["fp32 original"]) for n in names[1:]},
        "times_smaller": {n: smaller[n] for n in names[1:]},
        "parameters": {n: r["parameters"] for n, r in rows.items()},
        "examples_per_s": {n: r["examples_per_s"] for n, r in rows.items()},
        "structured": args.structured,
        "distillation": {
            "student_layers": args.student_layers,
            "steps": args.distill_steps,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "kl_to_teacher_distilled": kl_to_teacher(args.model, distilled, val, args),
            "kl_to_teacher_alone": kl_to_teacher(args.model, alone, val, args),
        },
    }
    dist = figures["distillation"]
    checks.update(
        {
            "int8 >= 3.5x smaller": smaller["int8"] >= 3.5,
            "int8 accuracy within 1 point": abs(acc["int8"] - acc["fp32 original"]) <= 0.01,
            "int4 g32 >= 6x smaller": smaller["int4 g32"] >= 6,
            "wanda 50% accuracy >= magnitude 50%": acc["wanda 50%"] >= acc["magnitude 50%"],
            "structured -25% has fewer parameters": rows["heads+neurons -25%"]["parameters"] < base["parameters"],
            "distillation lowers the KL to the teacher": dist["kl_to_teacher_distilled"] < dist["kl_to_teacher_alone"],
            "distilled student accuracy > student alone": acc[d] > acc[a],
        }
    )
    out = args.out / f"compress_classifier-{started}.json"
    payload = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "model": str(args.model),
        "train": str(args.train),
        "val": str(val),
        "environment": report.environment(),
        "seconds": time.perf_counter() - clock,
        "figures": figures,
        "checks": checks,
        "report": {k: result[k] for k in ("table", "json", "png")},
    }
    write_atomic(out, json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"figures": figures, "checks": checks}, indent=2))
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
