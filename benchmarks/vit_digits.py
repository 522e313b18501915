"""ViT image classification on scikit-learn's digits: accuracy on a fixed held-out 20%.

Data: load_digits (1,797 real 8x8 handwritten digits), split once (seed 0) into train and a
held-out val (`llm data examples digits`), read straight from the .npz files (no shards).
Model: a small ViT (8x8 images, 2x2 patches: 16 patches + [CLS]) trained from scratch by
`llm pretrain` with task image_classification, then scored by `llm eval` on val.
The goal is >= 95% held-out accuracy.

    python benchmarks/vit_digits.py                   # ~2,000 steps of batch 64 on a CPU

Prints a table and writes JSON under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", default="runs/bench-digits")
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    args = p.parse_args()

    import yaml

    from llm.bench.common import format_table, write_results
    from llm.data.corpora import write_corpus
    from llm.run.evaluate import evaluate_model

    work = Path(args.work)
    data = write_corpus("digits", work / "data", val_fraction=0.2, seed=0)
    print(f"digits: {data['train_examples']} train, {data['val_examples']} held-out val images", flush=True)
    model = {
        "family": "vit",
        "image_size": 8,
        "patch_size": 2,
        "num_channels": 1,
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": 256,
        "norm": "layernorm",
        "norm_position": "pre",
        "norm_eps": 1e-6,
        "position": "learned",
        "mlp": "gelu",
        "causal": False,
        "tie_embeddings": False,
        "dropout": 0.1,
    }
    recipe = {
        "model": model,
        "task": {"name": "image_classification"},
        "data": {"train": data["train"], "val": data["val"]},
        "run_dir": str(work / "run"),
        "seed": 0,
        "train": {
            "micro_batch_size": args.batch_size,
            "max_steps": args.steps,
            "log_every": 100,
            "eval_every": 500,
            "eval_batches": 100,
        },
        "optim": {"lr": args.lr, "weight_decay": 0.05, "betas": [0.9, 0.999]},
        "schedule": {"warmup_steps": args.steps // 20, "decay": "cosine", "min_lr_ratio": 0.01},
        "deepspeed": {"preset": "zero0"},
        "checkpoint": {"keep_last": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    path = work / "vit-digits.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llm", "pretrain", str(path), "--resume", "none"], env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"llm pretrain exited {proc.returncode}")
    seconds = time.perf_counter() - started
    result = evaluate_model(work / "run" / "export", data["val"], batch_size=256, out=work / "eval")
    row = {"model": "vit 4x128, 2x2 patches", "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
           "steps": args.steps, "train_seconds": seconds}  # fmt: skip
    print(format_table([row]))
    out = write_results(
        "vit_digits",
        [row],
        args.out,
        data={"train": data["train_examples"], "val": data["val_examples"], "val_fraction": 0.2, "split_seed": 0},
        recipe=recipe,
        confusion=result["confusion"],
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
