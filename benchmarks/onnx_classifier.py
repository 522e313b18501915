"""A fine-tuned text classifier in ONNX Runtime, fp32 and int8, against llm's own forward.

Takes a classifier (anything `load_model` reads, e.g. the export of `benchmarks/finetune_sentiment.py
--methods full`, the MiniLM sentiment classifier) and the held-out JSONL it is scored on; writes it with
`llm convert --to onnx` and `--to onnx --int8` (ONNX Runtime's dynamic quantization) and measures, on the
same batches from the task's own reader: held-out accuracy of each, and CPU examples/s of one forward pass
over the first batch (the three run in turn within each round, median over rounds; one thread each:
torch.set_num_threads(1), ONNX Runtime intra_op_num_threads=1).

    PYTHONPATH=. python benchmarks/onnx_classifier.py MODEL --val VAL.jsonl [--batch-size 32] [--seq-len 64]
        [--rounds 10] [--work DIR]

Prints a table and writes JSON under benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.bench.common import format_table, write_results  # noqa: E402
from llm.compress import report  # noqa: E402
from llm.data.config import DataConfig  # noqa: E402
from llm.run.convert import write_format  # noqa: E402
from llm.run.loader import find_tokenizer, load_model  # noqa: E402
from llm.tasks import task_of  # noqa: E402


class OnnxRuntime:
    """An ONNX Runtime session of model.onnx called as an llm model is: keyword tensors in, `.logits` out.
    Graph inputs the batch lacks (token_type_ids) are zeros, as llm's forward takes them."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def eval(self) -> OnnxRuntime:
        return self

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        ids = batch["input_ids"]
        feed = {name: batch.get(name, torch.zeros_like(ids)).numpy() for name in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def held_out_batches(model, val: str, tokenizer: Path, seq_len: int, batch_size: int) -> list[dict]:
    data = DataConfig(source="shards", train=val, val=val, seq_len=seq_len, tokenizer=str(tokenizer))
    batches = task_of(model).batches(model.config, data, "val", seed=0, micro_batch_size=batch_size, rank=0,
                                     world_size=1)  # fmt: skip
    out = []
    while (batch := batches.next_batch()) is not None:
        out.append(batch)
    return out


@torch.no_grad()
def accuracy(runner, batches: list[dict]) -> float:
    right = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        right += int((runner(**inputs).logits.argmax(-1) == batch["labels"]).sum())
        total += batch["labels"].numel()
    return right / total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a text classifier (llm directory, Hugging Face directory or run export)")
    p.add_argument("--val", required=True, help="held-out JSONL (text, label) it is scored on")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (after one warm-up)")
    p.add_argument("--work", default="runs/onnx_classifier", help="the ONNX exports go here")
    p.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results/)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model).eval(), find_tokenizer(args.model)
    folders = {"onnxruntime fp32": Path(args.work) / "fp32", "onnxruntime int8": Path(args.work) / "int8"}
    runners = {"llm fp32": model}
    for name, folder in folders.items():
        write_format(model, folder, "onnx", tokenizer, **({"int8": True} if "int8" in name else {}))
        runners[name] = OnnxRuntime(folder)
    batches = held_out_batches(model, args.val, tokenizer, args.seq_len, args.batch_size)
    speed = report.forward_speed(runners, batches[0], args.rounds)
    rows = []
    for name, runner in runners.items():
        size = sum(f.stat().st_size for f in folders[name].glob("model.onnx*")) / 2**20 if name in folders else None
        rows.append({"model": name, "accuracy": accuracy(runner, batches), "examples_per_s": speed[name],
                     "speedup": speed[name] / speed["llm fp32"], "file_mib": size})  # fmt: skip
    headers = {"examples_per_s": "examples/s", "file_mib": "model.onnx (MiB)"}
    notes = {"speedup": "examples/s over llm fp32's, same batch, rounds interleaved"}
    print(format_table(rows, headers=headers, notes=notes))
    shape = list(batches[0]["input_ids"].shape)
    import onnx
    import onnxruntime

    path = write_results("onnx_classifier", rows, args.out, model=args.model, val=args.val, rounds=args.rounds,
                         timed_batch=shape, examples=sum(b["labels"].numel() for b in batches),
                         onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                         load_average=os.getloadavg())  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
