"""Fine-tuning cost: LoRA against full fine-tuning of the same model on the same batches.

Each method runs through the real trainer (the DeepSpeed engine `llm finetune` uses, one
rank, ZeRO-0, synthetic causal-LM batches) in a fresh process of its own, so that its
peak memory is its own: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the growth
of the process's peak resident set (ru_maxrss) from before the model is built. Tokens/s
is the median of the trainer's timed steps after warm-up. One invocation measures every
method, interleaving nothing else; the table and a JSON (hardware, versions, command) go
to benchmarks/results/ (or $OUT).

    python benchmarks/lora_vs_full.py                       # gpt2-124m, batch 4 x 256, fp32 on CPU
    python benchmarks/lora_vs_full.py --model gpt2-tiny --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llm.bench.common import format_table, write_results

METHODS = {
    "full": [],
    "lora q,v r=8": [{"name": "lora", "rank": 8, "alpha": 16, "targets": ["q", "v"]}],
    "lora all linear r=8": [
        {"name": "lora", "rank": 8, "alpha": 16, "targets": ["q", "k", "v", "proj", "fc_in", "fc_out"]}
    ],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m", help="a model preset or config file")
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences per step)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--precision", default=None, help="fp32 (default on CPU) or bf16 (default on GPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--out", default=None, help="results folder (default $OUT or benchmarks/results/)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> dict:
    """In its own process: assemble the trainer for one method, time its steps, report its peak memory."""
    from llm.run.recipe import resolve_recipe
    from llm.run.train import assemble
    from llm.train.distributed import distributed

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="llm-bench-lora-") as run_dir:
        recipe = resolve_recipe(
            {
                "model": {"base": args.model},
                "data": {"source": "synthetic", "seq_len": args.seq},
                "run_dir": run_dir,
                "transforms": METHODS[args.worker],
                "train": {"micro_batch_size": args.batch, "max_steps": 10**6, "log_every": 10**6,
                          "precision": args.precision},
                "deepspeed": {"preset": "zero0"},
                "checkpoint": {"save_final": False},
                "logging": {"tensorboard": False, "progress": False},
            }
        )  # fmt: skip
        with distributed(recipe.faults.collective_timeout_s) as dist:
            rss_before = rss_bytes()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer = assemble(recipe, dist, resume="none").trainer
            for _ in range(args.warmup):
                trainer.train_step()
            steps = [trainer.train_step() for _ in range(args.steps)]
            model = trainer.model
            return {
                "method": args.worker,
                "params": model.num_parameters(),
                "trainable": model.num_parameters(trainable_only=True),
                "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
                "step_s": statistics.median(s["step_time_s"] for s in steps),
                "peak_gib": (torch.cuda.max_memory_allocated() if cuda else rss_bytes() - rss_before) / 2**30,
                "peak_source": "cuda max_memory_allocated" if cuda else "growth of peak RSS (ru_maxrss)",
                "loss": steps[-1]["loss"],
            }


def main() -> None:
    args = parse_args()
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows, load = [], [os.getloadavg()[0]]
    for method in METHODS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--precision", args.precision, "--worker", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        load.append(os.getloadavg()[0])
    full = rows[0]
    for row in rows:
        row["trainable_pct"] = 100 * row["trainable"] / row["params"]
        row["speed_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["memory_vs_full"] = row["peak_gib"] / full["peak_gib"]
    columns = ["method", "trainable", "trainable_pct", "tokens_per_s", "speed_vs_full", "peak_gib", "memory_vs_full"]
    print(format_table(rows, columns))
    config = {k: getattr(args, k) for k in ("model", "batch", "seq", "precision", "warmup", "steps")}
    # other jobs on the machine slow every method; the 1-minute load average says how busy it was
    path = write_results("lora_vs_full", rows, args.out, config=config, load_average_1min=load)
    print(f"results: {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
