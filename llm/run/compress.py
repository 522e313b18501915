"""`llm compress {quantize,prune,report}`: load a model from any path, compress it, save it as an
llm model directory (with the tokenizer beside the source), or measure variants against it."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import torch

from llm import transforms
from llm.compress import prune, report
from llm.data.config import DataConfig
from llm.errors import UserError
from llm.log import logger
from llm.run.evaluate import evaluate_model
from llm.run.loader import find_tokenizer, load_model, save_pretrained
from llm.tasks import task_of


def _check_out(model_path: str | Path, out: str | Path) -> Path:
    out = Path(out)
    if out.resolve() == Path(model_path).resolve():
        raise UserError(f"{out}: the output would overwrite the model it is made from; choose another directory")
    return out


def quantize_model(model: str, out: str, method: str = "int8", group_size: int = 32) -> Path:
    """Quantize the model at `model` (see llm.compress.quantize) and save it to `out`."""
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
    return path


def calibration_batches(model, data: str | Path, model_path: str, batch_size: int, seq_len: int | None = None):
    """The task's batches over the shard directory `data`, in order (calibration for Wanda)."""
    tokenizer = find_tokenizer(model_path)
    cfg = model.config
    config = DataConfig(
        source="shards", val=str(data), seq_len=seq_len or cfg.max_seq_len, tokenizer=tokenizer and str(tokenizer)
    )
    return task_of(model).batches(cfg, config, "val", seed=0, micro_batch_size=batch_size, rank=0, world_size=1)


def prune_model(
    model: str,
    out: str,
    method: str = "magnitude",
    sparsity: float = 0.0,
    scope: str = "layer",
    data: str | None = None,
    structured: str | None = None,
    calibration_batches_n: int = 8,
    batch_size: int = 4,
) -> dict:
    """Unstructured (`method`, `sparsity`, `scope`; Wanda calibrates on `data`) and/or structured
    (`structured` = "heads=K,neurons=M") pruning of the model at `model`, saved to `out`."""
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
            batches = calibration_batches(m, data, model, batch_size)
            norms = prune.input_norms(m, batches, calibration_batches_n)
        prune.prune_unstructured(m, sparsity, method, scope, norms)
        summary["sparsity"] = prune.sparsity_of(m)
    summary["parameters"] = m.num_parameters()
    summary["path"] = str(save_pretrained(m, out_dir, find_tokenizer(model)))
    logger.info(f"{model} pruned -> {out_dir}: {before:,} -> {summary['parameters']:,} parameters")
    return summary


def compress_report(
    model: str,
    variants: list[str],
    data: str,
    out: str,
    prompt_tokens: int = 16,
    new_tokens: int = 64,
    rounds: int = 5,
    eval_batches: int | None = None,
    batch_size: int = 8,
    names: list[str] | None = None,
    seq_len: int | None = None,
) -> dict:
    """Size, parameters, CPU speed (causal LMs: generation tokens/s; other tasks: forward examples/s
    over the first batch of `data`) and held-out quality (the task's metrics on `data`: perplexity, or
    accuracy for classifiers, whose confusion matrices go to OUT/confusion-<i>) of `model` and each
    variant. `seq_len` caps the evaluation windows or texts (default: the model's max_seq_len)."""
    paths = [model, *variants]
    labels = names or [Path(p).name or str(p) for p in paths]
    if len(labels) != len(paths):
        raise UserError(f"--names: expected {len(paths)} names (the model and each variant), got {len(labels)}")
    models = {label: load_model(p).eval() for label, p in zip(labels, paths)}
    base = models[labels[0]]
    for label, p in zip(labels[1:], paths[1:]):
        if models[label].task != base.task:
            raise UserError(f"{p}: a {models[label].task!r} model, the original is a {base.task!r} model")
    speed, speed_key = {}, "tokens_per_s"
    if base.task == "causal_lm":
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, base.config.vocab_size, (1, prompt_tokens), generator=g)
        speed = report.generation_speed(models, prompt, new_tokens, rounds)
        speed_meta = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds, "batch": 1}
    else:
        batch = calibration_batches(base, data, model, batch_size, seq_len).next_batch()
        if batch is None:
            raise UserError(f"{data}: no examples to time")
        speed, speed_key = report.forward_speed(models, batch, rounds), "examples_per_s"
        speed_meta = {
            "rounds": rounds,
            "batch": int(batch["input_ids"].shape[0]),
            "shape": list(batch["input_ids"].shape),
        }
    rows = []
    out_dir = Path(out)
    for i, (label, p) in enumerate(zip(labels, paths)):
        started = time.perf_counter()
        metrics = evaluate_model(
            p, data, seq_len=seq_len, batch_size=batch_size, max_batches=eval_batches, out=out_dir / f"confusion-{i}"
        )
        rows.append(
            {
                "name": label,
                "path": str(p),
                "size_bytes": report.size_on_disk(p),
                "parameters": models[label].num_parameters(),
                "transforms": models[label].transforms,
                speed_key: speed.get(label, float("nan")),
                "metrics": metrics,
                "eval_s": time.perf_counter() - started,
            }
        )
    meta = {
        "command": shlex.join(["llm", *sys.argv[1:]]) if sys.argv and "llm" in sys.argv[0] else None,
        "data": str(data),
        "speed": speed_meta,
    }
    written = report.write(rows, out, meta)
    print(report.table(rows))
    return {"rows": rows, **{k: str(v) for k, v in written.items()}}
