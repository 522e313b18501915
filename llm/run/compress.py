"""`llm compress {quantize,prune,report}`: load a model from any path, compress it, save it as an
llm model directory (with the tokenizer beside the source), or measure variants against it."""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from llm import transforms
from llm.bench import inference
from llm.compress import awq, gptq, prune, report, sparsegpt
from llm.data.config import DataConfig
from llm.errors import UserError
from llm.log import logger
from llm.models.base import Model
from llm.run.evaluate import evaluate
from llm.run.loader import find_tokenizer, load_model, save_pretrained
from llm.tasks import task_of
from llm.train.distributed import launcher_name


def _check_out(model_path: str | Path, out: str | Path) -> Path:
    out = Path(out)
    if out.resolve() == Path(model_path).resolve():
        raise UserError(f"{out}: the output would overwrite the model it is made from; choose another directory")
    return out


def quantize_model(
    model: str,
    out: str,
    *,
    method: Literal["int8", "int4", "int8-dynamic"] = "int8",
    algorithm: Literal["rtn", "gptq", "awq"] = "rtn",
    group_size: int = 32,
    data: str | None = None,
    calibration_batches: int = 16,
    batch_size: int = 4,
) -> Path:
    """Post-training quantization of every Linear, the head and the embeddings: int8 / int4 weight-only, or int8
    dynamic (activations too, for encoders and classifiers); run on llm's CPU kernels.

    The integers are rounded to nearest (rtn), or chosen for the blocks' Linear layers from calibration data,
    block by block: GPTQ (each column's rounding error compensated in the columns after it) or AWQ (salient
    input channels scaled up, weights clipped); the file's format is the same. Under torchrun each rank
    calibrates on its share of the batches and the result is the one-rank result. See llm.compress.quantize,
    gptq and awq; the quantized model is saved as an llm model directory with the source's tokenizer beside it.

    Args:
        model: a model, run or checkpoint directory, or a Hugging Face directory
        out: the llm model directory to write
        method: int8 or int4 weight-only, or int8 weights with int8 dynamic activations (rtn only)
        algorithm: how the integers are chosen: round to nearest, or calibrated (gptq, awq: need --data)
        group_size: int4: input columns per scale
        data: gptq, awq: calibration shard directory or example file
        calibration_batches: gptq, awq: batches of calibration data
        batch_size: gptq, awq: windows or examples per calibration batch

    Example:
        llm compress quantize runs/quickstart/export runs/quickstart/int8 --method int8
        llm compress quantize runs/quickstart/export runs/quickstart/gptq --method int4 --group-size 128 \\
            --algorithm gptq --data data/quickstart/train
    """
    out_dir = _check_out(model, out)
    m = load_model(model).float().eval()
    if algorithm != "rtn" and method == "int8-dynamic":
        raise UserError(f"--algorithm {algorithm}: quantizes weights only (--method int4 or int8)")
    with _launch() as (rank, world, group):
        if algorithm == "rtn":
            with _named_errors(model, data):
                spec = {"name": "quantize", "method": method, "group_size": group_size}
                transforms.apply_transform(m, spec, "quantize")
        else:
            batches = _share(m, data, model, f"--algorithm {algorithm}", calibration_batches, batch_size, rank, world)
            with _named_errors(model, data):
                (gptq.quantize_model if algorithm == "gptq" else awq.quantize_model)(
                    m, batches, method, group_size, group=group
                )
        path = save_pretrained(m, out_dir, find_tokenizer(model)) if rank == 0 else out_dir
    logger.info(f"{model} quantized ({method}, {algorithm}) -> {path}")
    if rank == 0:
        print(path)
    return path


@contextlib.contextmanager
def _named_errors(model: str, data: str | None):
    """A UserError from the compression names where it comes from: the --data path for "calibration data: ..."
    (llm.compress.calibrate's errors), else the model."""
    try:
        yield
    except UserError as e:
        text = str(e)
        if text.startswith(CALIBRATION):
            raise UserError(f"{data}: {text[len(CALIBRATION) :]}") from None
        raise UserError(text if text.startswith(str(model)) else f"{model}: {text}") from None


CALIBRATION = "calibration data: "


@contextlib.contextmanager
def _launch():
    """(rank, world size, process group) of a launch (torchrun's environment; gloo: the calibration runs on the
    CPU), the group started here and ended on leaving; (0, 1, None) for a lone process. Raises UserError under
    an MPI launcher (its ranks would all write OUT)."""
    launcher = launcher_name()
    if launcher == "mpi":
        raise UserError("llm compress: run it alone or under torchrun, not under an MPI launcher")
    if launcher == "single" or os.environ["WORLD_SIZE"] == "1":
        yield 0, 1, None
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _share(model: Model, data: str | None, model_path: str, what: str, n: int, batch_size: int, rank: int, world: int):
    """This rank's share of the first `n` calibration batches of `data`: batches rank, rank + world, ... (every
    rank reads the one-rank sequence, so the ranks together see exactly the one-rank samples)."""
    if not data:
        raise UserError(f"{what}: needs calibration data (--data SHARDS)")
    if n <= 0:
        raise UserError(f"--calibration-batches: expected a positive number, got {n}")
    batches = calibration_batches(model, data, model_path, batch_size)
    return [b for i, b in enumerate(itertools.islice(iter(batches.next_batch, None), n)) if i % world == rank]


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


def calibration_batches(model: Model, data: str, model_path: str, batch_size: int, seq_len: int | None = None):
    """The task's batches over `data` in order, read as `shard_config` says (calibration, the timed batch);
    `.next_batch()` gives each, then None."""
    config = shard_config(model, data, model_path, seq_len)
    return task_of(model).batches(
        model.config, config, "val", seed=0, micro_batch_size=batch_size, rank=0, world_size=1
    )


def prune_model(
    model: str,
    out: str,
    *,
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude",
    sparsity: float = 0.0,
    pattern: str | None = None,
    scope: Literal["layer", "global"] = "layer",
    structured: str | None = None,
    data: str | None = None,
    calibration_batches: int = 8,
    batch_size: int = 4,
) -> dict:
    """Unstructured (magnitude, Wanda, SparseGPT), n:m or structured (heads, neurons) pruning.

    Unstructured pruning zeroes a fraction of the weights of every Linear layer inside the blocks,
    those with the smallest |W| (magnitude) or |W| x input norm over calibration batches (Wanda), or
    chooses them block by block from calibration data and updates the weights left to compensate
    (SparseGPT); --pattern 2:4 zeroes 2 of every 4 consecutive weights of a row instead, for any method.
    Structured pruning removes whole attention heads and MLP neurons (see llm.compress.prune).
    Give --sparsity or --pattern, --structured, or both. Under torchrun SparseGPT calibrates each rank's
    share of the batches and the result is the one-rank result.

    Args:
        model: a model, run or checkpoint directory, or a Hugging Face directory
        out: the llm model directory to write
        method: how weights are chosen for unstructured or n:m pruning
        sparsity: fraction of block weights set to zero, 0 < S < 1
        pattern: n:m, e.g. 2:4: n of every m consecutive weights of a row set to zero (instead of --sparsity)
        scope: magnitude, wanda: remove the fraction from every layer separately, or rank all layers' weights together
        structured: units removed per block, heads=K,neurons=M
        data: calibration shard directory or example file (needed by wanda and sparsegpt)
        calibration_batches: wanda, sparsegpt: batches of calibration data
        batch_size: wanda, sparsegpt: windows or examples per calibration batch

    Example:
        llm compress prune runs/quickstart/export runs/quickstart/wanda50 --method wanda --sparsity 0.5 \\
            --data data/quickstart/train
        llm compress prune runs/quickstart/export runs/quickstart/sparsegpt24 --method sparsegpt --pattern 2:4 \\
            --data data/quickstart/train
        llm compress prune runs/quickstart/export runs/quickstart/pruned --structured heads=1,neurons=128
    """
    if not sparsity and not pattern and not structured:
        raise UserError(
            "llm compress prune: give --sparsity S or --pattern n:m (unstructured) "
            "and/or --structured heads=K,neurons=M"
        )
    if sparsity and pattern:
        raise UserError(f"--pattern {pattern}: sets the sparsity (n/m); give --sparsity or --pattern, not both")
    if sparsity and not 0 < sparsity < 1:
        raise UserError(f"--sparsity: expected 0 < S < 1, got {sparsity}")
    out_dir = _check_out(model, out)
    m = load_model(model).float().eval()
    before = m.num_parameters()
    summary: dict = {"parameters_before": before}
    with _launch() as (rank, world, group):
        batches = None
        if (sparsity or pattern) and method != "magnitude":  # wanda: the same batches on every rank
            batches = _share(m, data, model, f"--method {method}", calibration_batches, batch_size,
                             *((rank, world) if method == "sparsegpt" else (0, 1)))  # fmt: skip
        with _named_errors(model, data):
            if structured:
                prune.prune_structured(m, *prune.parse_structured(structured))
            if method == "sparsegpt" and batches is not None:
                sparsegpt.prune_model(m, batches, sparsity, pattern, group=group)
            elif sparsity or pattern:
                norms = prune.input_norms(m, batches, calibration_batches) if batches is not None else None
                prune.prune_unstructured(m, sparsity, method, scope, norms, pattern)
        if sparsity or pattern:
            summary["sparsity"] = prune.sparsity_of(m)
        summary["parameters"] = m.num_parameters()
        summary["path"] = str(save_pretrained(m, out_dir, find_tokenizer(model)) if rank == 0 else out_dir)
    logger.info(f"{model} pruned -> {out_dir}: {before:,} -> {summary['parameters']:,} parameters")
    if rank == 0:
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
    """Size on disk, parameters, zeros, CPU speed and held-out quality of variants against the original.

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
        batch = calibration_batches(base, data, model, batch_size, seq_len).next_batch()
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
                "sparsity": prune.sparsity_of(m),
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
