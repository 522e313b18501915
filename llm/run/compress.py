"""`llm compress {quantize,prune,report}`: load a model from any path, compress it, save it as an
llm model directory (with the tokenizer beside the source), or measure variants against it."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from llm import transforms
from llm.bench import inference
from llm.compress import prune, report
from llm.data.config import DataConfig
from llm.errors import UserError
from llm.log import logger
from llm.models.base import Model
from llm.run.evaluate import evaluate
from llm.run.loader import find_tokenizer, load_model, save_pretrained
from llm.tasks import task_of


def _check_out(model_path: str | Path, out: str | Path) -> Path:
    out = Path(out)
    if out.resolve() == Path(model_path).resolve():
        raise UserError(f"{out}: the output would overwrite the model it is made from; choose another directory")
    return out


def quantize_model(
    model: str, out: str, *, method: Literal["int8", "int4", "int8-dynamic"] = "int8", group_size: int = 32
) -> Path:
    """Post-training quantization of every Linear, the head and the embeddings: int8 / int4 weight-only, or int8
    dynamic (activations too, for encoders and classifiers); run on llm's CPU kernels.

    See llm.compress.quantize; the quantized model is saved as an llm model directory with the
    source's tokenizer beside it.

    Args:
        model: a model, run or checkpoint directory, or a Hugging Face directory
        out: the llm model directory to write
        method: int8 or int4 weight-only, or int8 weights with int8 dynamic activations
        group_size: int4: input columns per scale

    Example:
        llm compress quantize runs/quickstart/export runs/quickstart/int8 --method int8
    """
    out_dir = _check_out(model, out)
    m = load_model(model).float().eval()
    try:
        transforms.apply_transform(m, {"name": "quantize", "method": method, "group_size": group_size}, "quantize")
    except Exception as e:
        if isinstance(e, UserError):
            raise UserError(f"{model}: {e}") from None
        raise
    path = save_pretrained(m, out_dir, find_tokenizer(model))
    logger.info(f"{model} quantized ({method}) -> {path}")
    print(path)
    return path


def shard_config(model: Model, data: str, model_path: str, seq_len: int | None = None) -> DataConfig:
    """Reading `data` (a shard directory or an example file) for `model`: its windows or texts cut to
    `seq_len` (absent: the model's max_seq_len), example files read with the tokenizer beside `model_path`."""
    tokenizer = find_tokenizer(model_path)
    return DataConfig(
        source="shards",
        train=str(data),
        val=str(data),
        seq_len=seq_len or model.config.max_seq_len,
        tokenizer=tokenizer and str(tokenizer),
    )


def _batches(model: Model, config: DataConfig, batch_size: int):
    """The task's batches over `config.val`, in order (Wanda's calibration, the timed batch)."""
    return task_of(model).batches(
        model.config, config, "val", seed=0, micro_batch_size=batch_size, rank=0, world_size=1
    )


def prune_model(
    model: str,
    out: str,
    *,
    method: Literal["magnitude", "wanda"] = "magnitude",
    sparsity: float = 0.0,
    scope: Literal["layer", "global"] = "layer",
    structured: str | None = None,
    data: str | None = None,
    calibration_batches: int = 8,
    batch_size: int = 4,
) -> dict:
    """Unstructured (magnitude, Wanda) or structured (heads, neurons) pruning.

    Unstructured pruning zeroes a fraction of the weights of every Linear layer inside the blocks,
    those with the smallest |W| (magnitude) or |W| x input norm over calibration batches (Wanda);
    structured pruning removes whole attention heads and MLP neurons (see llm.compress.prune).
    Give --sparsity, --structured, or both.

    Args:
        model: a model, run or checkpoint directory, or a Hugging Face directory
        out: the llm model directory to write
        method: how weights are scored for unstructured pruning
        sparsity: fraction of block weights set to zero
        scope: remove the fraction from every layer separately, or rank all layers' weights together
        structured: units removed per block, heads=K,neurons=M
        data: calibration shard directory or example file (needed by wanda)
        calibration_batches: wanda: batches of calibration data
        batch_size: wanda: windows or examples per calibration batch

    Example:
        llm compress prune runs/quickstart/export runs/quickstart/wanda50 --method wanda --sparsity 0.5 \\
            --data data/quickstart/train
        llm compress prune runs/quickstart/export runs/quickstart/pruned --structured heads=1,neurons=128
    """
    if not sparsity and not structured:
        raise UserError("llm compress prune: give --sparsity S (unstructured) and/or --structured heads=K,neurons=M")
    out_dir = _check_out(model, out)
    m = load_model(model).float().eval()
    before = m.num_parameters()
    summary: dict = {"parameters_before": before}
    if structured:
        heads, neurons = prune.parse_structured(structured)
        prune.prune_structured(m, heads, neurons)
    if sparsity:
        norms = None
        if method == "wanda":
            if not data:
                raise UserError("--method wanda: needs calibration data (--data SHARDS)")
            batches = _batches(m, shard_config(m, data, model), batch_size)
            norms = prune.input_norms(m, batches, calibration_batches)
        prune.prune_unstructured(m, sparsity, method, scope, norms)
        summary["sparsity"] = prune.sparsity_of(m)
    summary["parameters"] = m.num_parameters()
    summary["path"] = str(save_pretrained(m, out_dir, find_tokenizer(model)))
    logger.info(f"{model} pruned -> {out_dir}: {before:,} -> {summary['parameters']:,} parameters")
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


def compress_report(
    model: str,
    variants: list[str] | None = None,
    *,
    data: str,
    out: str,
    names: list[str] | None = None,
    prompt_tokens: int = 16,
    new_tokens: int = 64,
    rounds: int = 5,
    max_batches: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
) -> dict:
    """Size on disk, parameters, CPU speed and held-out quality of variants against the original.

    Speed: causal LMs generate (tokens/s, batch 1, with the bandwidth limit of each), other tasks run
    forward passes over the first batch of DATA (examples/s); rounds alternate between the models and
    the original's peers that are installed (transformers; llama.cpp GGUF Q8_0/Q4_0 or ONNX Runtime int8
    through `llm convert`), see `llm bench decode`. Quality: the task's metrics on
    DATA (perplexity, or accuracy and macro-F1 for classifiers, whose confusion matrices go to
    OUT/confusion-<i>). Prints the table and writes report.txt, report.json and report.png.

    Args:
        model: the original model
        variants: compressed variants
        data: held-out shard directory or example file
        out: directory for report.txt, report.json, report.png
        names: labels for the model and each variant (default: the directory names)
        prompt_tokens: causal LMs: prompt length of each speed run
        new_tokens: causal LMs: generated tokens per speed run
        rounds: interleaved speed rounds
        max_batches: evaluation batches (default: all)
        batch_size: evaluation batch (classifiers: also the timed batch)
        seq_len: cut windows or texts to this (default: the model's max_seq_len)

    Example:
        llm compress report runs/quickstart/export runs/quickstart/int8 --data data/quickstart/val \\
            --out runs/quickstart/report
    """
    paths = [model, *(variants or [])]
    labels = names or [Path(p).name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise UserError(f"--names: expected {len(paths)} names (the model and each variant), got {len(labels)}")
    models = {label: load_model(p).eval() for label, p in zip(labels, paths)}
    base = models[labels[0]]
    for label, p in zip(labels[1:], paths[1:]):
        if models[label].task != base.task:
            raise UserError(f"{p}: a {models[label].task!r} model, the original is a {base.task!r} model")
    if base.task == "causal_lm":
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, base.config.vocab_size, (1, prompt_tokens), generator=g)
        job, peers, speed_key = {"prompt": prompt, "new_tokens": new_tokens}, inference.DECODE_PEERS, "tokens_per_s"
        speed_meta = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds, "batch": 1}
    else:
        batch = _batches(base, shard_config(base, data, model, seq_len), batch_size).next_batch()
        if batch is None:
            raise UserError(f"{data}: no examples to time")
        job = {"inputs": {k: v for k, v in batch.items() if k != "labels"}}
        peers, speed_key = inference.CLASSIFY_PEERS, "examples_per_s"
        speed_meta = {
            "rounds": rounds,
            "batch": int(batch["input_ids"].shape[0]),
            "shape": list(batch["input_ids"].shape),
        }
    speed_rows, not_measured = inference.measure(models, peers, job, rounds, find_tokenizer(model))
    speed = {r["name"]: r[speed_key] for r in speed_rows}
    rows = []
    out_dir = Path(out)
    for i, (label, p) in enumerate(zip(labels, paths)):
        started = time.perf_counter()
        m = models[label]
        metrics = evaluate(
            m,
            shard_config(m, data, p, seq_len),
            batch_size=batch_size,
            max_batches=max_batches,
            out=out_dir / f"confusion-{i}",
            name=p,
        )
        rows.append(
            {
                "name": label,
                "path": str(p),
                "size_bytes": report.size_on_disk(p),
                "parameters": m.num_parameters(),
                "transforms": m.transforms,
                speed_key: speed.get(label, float("nan")),
                "metrics": metrics,
                "eval_s": time.perf_counter() - started,
            }
        )
    meta = {
        "command": shlex.join(["llm", *sys.argv[1:]]) if sys.argv and "llm" in sys.argv[0] else None,
        "data": str(data),
        "speed": {**speed_meta, "rows": speed_rows, "not_measured": not_measured},
    }
    written = report.write(rows, out, meta)
    print(report.table(rows))
    print(inference.speed_table(speed_rows, not_measured))
    result = {"rows": rows, **{k: str(v) for k, v in written.items()}}
    print(f"wrote {result['table']}, {result['json']}, {result['png']}")
    return result
