"""llm's GPTQ beside llm-compressor's (the `llmcompressor` package) on the same model, calibration windows,
held-out windows and group size: int4, symmetric, one scale per 128 input columns, the blocks' Linear layers
(the LM head and the embeddings stay float on both sides: llm's GPTQ blocks are scored with the float
embeddings and head, as compress_algorithms.py's "blocks only" rows). Goal (issue 25): llm's perplexity within
1% of llm-compressor's.

llmcompressor 0.14 pins transformers and compressed-tensors below the project's, so it runs in its own venv,
which this script (project venv) calls with --python:

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor
    PYTHONPATH=. python benchmarks/gptq_vs_llmcompressor.py --model runs/quickstart/export \\
        --data data/quickstart --python /tmp/lcvenv/bin/python

The project side exports the model to Hugging Face (`llm convert --to hf`), writes the token windows that llm
calibrates on (the first --calibration-batches x --batch-size windows of DATA/train, as `llm compress quantize`
reads them) and scores (the first --eval-batches x --eval-batch-size of DATA/val) to WORK/windows.pt, makes and
scores llm's GPTQ variant, then runs itself under --python with --llmcompressor WORK: GPTQModifier over the same
windows, scored with transformers over the same held-out windows, the float model too (it must match llm's
float perplexity: the check that both sides score the same windows the same way).

Differences that remain, both llm-compressor's defaults: it finds each group's scale from the original weights
before the sweep (llm: from the updated weights when the group's first column comes up, as IST-DASLab/gptq), and
it orders columns by the Hessian's diagonal (`actorder: static`); both are measured, `actorder: null` is the
like-for-like row. transformers' GPT-2 keeps its Linear layers as Conv1D, which GPTQModifier does not target:
they are swapped for the equal nn.Linear first. Writes benchmarks/results/gptq_vs_llmcompressor-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GROUP_SIZE = 128


def hf_perplexity(model, windows: dict) -> float:
    """exp of the mean next-token loss over `windows` ("eval_input_ids", "eval_labels": int64 (N, T))."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(windows["eval_input_ids"].split(16), windows["eval_labels"].split(16)):
            logits = model(input_ids=ids).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += labels.numel()
    return math.exp(total / count)


def as_linear(model) -> None:
    """transformers' Conv1D (GPT-2: y = x W + b, W (in, out)) replaced by the equal nn.Linear (W^T)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(*module.weight.shape)
            linear.weight.data.copy_(module.weight.data.T)
            linear.bias.data.copy_(module.bias.data)
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, linear)


def llmcompressor_side(work: Path) -> None:
    """(llmcompressor venv) Perplexity of the float HF model and of GPTQModifier's W4A16 variants, into
    WORK/llmcompressor.json."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = torch.load(work / "windows.pt", weights_only=True)
    calibration = windows["calibration_input_ids"]
    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    result = {
        "llmcompressor": version("llmcompressor"),
        "transformers": version("transformers"),
        "ppl": {},
        "quantize_s": {},
    }
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    result["ppl"]["float"] = hf_perplexity(model, windows)
    for actorder in (None, "static"):
        model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        as_linear(model)
        recipe = GPTQModifier(
            targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder=actorder
        )
        started = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
                max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)  # fmt: skip
        result["quantize_s"][f"actorder {actorder}"] = time.perf_counter() - started
        result["ppl"][f"gptq actorder {actorder}"] = hf_perplexity(model.eval(), windows)
    (work / "llmcompressor.json").write_text(json.dumps(result, indent=2) + "\n")


def llm_side(args) -> dict:
    """(project venv) The HF export, the windows, and llm's float and GPTQ perplexities."""
    sys.path.insert(0, str(ROOT))
    from compress_algorithms import blocks_only

    from llm.run.compress import calibration_batches, quantize_model, shard_config
    from llm.run.convert import convert
    from llm.run.evaluate import evaluate
    from llm.run.loader import load_model

    train, val, work = str(args.data / "train"), str(args.data / "val"), args.work
    work.mkdir(parents=True, exist_ok=True)
    convert(str(args.model), str(work / "hf"), to="hf")
    model = load_model(args.model).eval()

    def windows(data: str, batches: int, batch_size: int) -> list[dict]:
        reader = calibration_batches(model, data, str(args.model), batch_size)
        return list(itertools.islice(iter(reader.next_batch, None), batches))

    calibration = windows(train, args.calibration_batches, args.batch_size)
    held_out = windows(val, args.eval_batches, args.eval_batch_size)
    torch.save(
        {
            "calibration_input_ids": torch.cat([b["input_ids"] for b in calibration]),
            "eval_input_ids": torch.cat([b["input_ids"] for b in held_out]),
            "eval_labels": torch.cat([b["labels"] for b in held_out]),
        },
        work / "windows.pt",
    )
    started = time.perf_counter()
    gptq = quantize_model(str(args.model), str(work / "llm-gptq"), method="int4", algorithm="gptq",
                          group_size=GROUP_SIZE, data=train, calibration_batches=args.calibration_batches,
                          batch_size=args.batch_size)  # fmt: skip
    quantize_s = time.perf_counter() - started
    config = shard_config(model, val, str(args.model))
    score = {"batch_size": args.eval_batch_size, "max_batches": args.eval_batches}
    return {
        "ppl": {
            "float": evaluate(model, config, **score, out=work / "eval", name=str(args.model))["ppl"],
            "gptq (blocks; float embeddings and head)": blocks_only(args.model, gptq, val, work, **score)["ppl"],
            "gptq (as `llm compress quantize` writes it: embeddings and head int4 RTN)": evaluate(
                load_model(gptq).eval(), config, **score, out=work / "eval", name=str(gptq)
            )["ppl"],
        },
        "quantize_s": quantize_s,
        "calibration_tokens": sum(int(b["input_ids"].numel()) for b in calibration),
        "eval_tokens": sum(int(b["labels"].numel()) for b in held_out),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/quickstart/export"))
    p.add_argument("--data", type=Path, default=Path("data/quickstart"), help="its train/ and val/ shard directories")
    p.add_argument("--python", default="/tmp/lcvenv/bin/python", help="a Python with llmcompressor installed")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=18)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("runs/gptq_vs_llmcompressor"))
    p.add_argument("--llmcompressor", type=Path, metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llmcompressor:
        llmcompressor_side(args.llmcompressor)
        return 0
    started = time.strftime("%Y%m%dT%H%M%S")
    llm = llm_side(args)
    subprocess.run([args.python, __file__, "--llmcompressor", str(args.work)], check=True)
    other = json.loads((args.work / "llmcompressor.json").read_text())
    ours = llm["ppl"]["gptq (blocks; float embeddings and head)"]
    theirs = other["ppl"]["gptq actorder None"]
    payload = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "model": str(args.model),
        "data": str(args.data),
        "group_size": GROUP_SIZE,
        "llm": llm,
        "llmcompressor": other,
        "float ppl: llm vs transformers (relative)": llm["ppl"]["float"] / other["ppl"]["float"] - 1,
        "gptq ppl: llm vs llmcompressor actorder null (relative)": ours / theirs - 1,
        "gptq ppl: llm vs llmcompressor actorder static (relative)": ours / other["ppl"]["gptq actorder static"] - 1,
        "checks": {"llm's GPTQ ppl within 1% of llmcompressor's (actorder null)": abs(ours / theirs - 1) <= 0.01},
    }
    out = ROOT / "benchmarks/results" / f"gptq_vs_llmcompressor-{started}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if k not in ("command",)}, indent=2))
    print(f"wrote {out}")
    return 0 if all(payload["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
