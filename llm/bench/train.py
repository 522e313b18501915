"""`llm bench train`: training tokens/s and MFU per model size and ZeRO stage on local ranks.

Each (model, stage) point is a fresh `llm.train.Trainer` on synthetic batches, started on
`--ranks` processes; after warm-up steps the median step's tokens/s (all ranks) and MFU
(model FLOPs, attention included, against the per-rank peak: the device table on a GPU, a
measured fp32 matmul peak on a CPU) are reported, from the trainer's own step metrics.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path

from llm.bench.common import format_table, write_results
from llm.bench.ranks import run_on_ranks


def bench_recipe(model: str, stage: int, cfg: dict, run_dir: str) -> dict:
    """A recipe mapping: the named model config (with cfg's "model_fields" on top), synthetic data, cfg's
    "sequence" ranks per sample (parallel.sequence, 1 by default), no checkpoints, no logging files."""
    return {
        "model": {"base": model, **cfg.get("model_fields", {})},
        "parallel": {"sequence": cfg.get("sequence", 1)},
        "data": {"source": "synthetic", "seq_len": cfg["seq_len"]},
        "run_dir": run_dir,
        "train": {"micro_batch_size": cfg["micro_batch"], "max_steps": 10**6, "precision": cfg["precision"],
                  "log_every": 10**6, "compile": cfg.get("compile", False)},
        "deepspeed": {"preset": f"zero{stage}"},
        "checkpoint": {"save_final": False},
        "logging": {"tensorboard": False, "progress": False},
    }  # fmt: skip


@contextlib.contextmanager
def bench_trainer(cfg: dict):
    """A Trainer assembled on this rank for the bench recipe of `cfg` (in a temporary run directory)."""
    from llm.run.recipe import resolve_recipe
    from llm.run.train import assemble
    from llm.train.distributed import distributed

    with tempfile.TemporaryDirectory(prefix="llm-bench-run-") as run_dir:
        recipe = resolve_recipe(bench_recipe(cfg["model"], cfg["stage"], cfg, run_dir))
        with distributed(recipe.faults.collective_timeout_s) as dist:
            yield assemble(recipe, dist, resume="none").trainer


def measure(cfg: dict) -> dict:
    """On every rank: build the Trainer, run warm-up + timed steps, return the timed steps' metrics."""
    from llm.train.metrics import device_peak_flops

    with bench_trainer(cfg) as trainer:
        for _ in range(cfg["warmup"]):
            trainer.train_step()
        steps = [trainer.train_step() for _ in range(cfg["steps"])]
        params = trainer.model.num_parameters()
        _, peak_source = device_peak_flops(trainer.dist.device, cfg["precision"])
    return {
        "params": params,
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
        "mfu": statistics.median(s["mfu"] for s in steps) if steps[0]["mfu"] is not None else None,
        "tflops": statistics.median(s["tflops"] for s in steps),
        "step_s": statistics.median(s["step_time_s"] for s in steps),
        "loss": steps[-1]["loss"],
        "peak_tflops_per_rank": trainer.peak_flops / 1e12,
        "peak_source": peak_source,
        "flops_per_token": trainer.flops_per_token,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    stages = sorted({r["zero"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        for ax, key, scale in ((axes[0], "tokens_per_s", 1), (axes[1], "mfu_pct", 1)):
            values = [next((r[key] * scale for r in rows if r["model"] == m and r["zero"] == stage), 0) for m in models]
            ax.bar([x + i * width for x in range(len(models))], values, width, label=f"ZeRO-{stage}")
    for ax, title in ((axes[0], "tokens/s (all ranks)"), (axes[1], "MFU (%)")):
        ax.set_xticks([x + width * (len(stages) - 1) / 2 for x in range(len(models))], models)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    r0 = rows[0]
    fig.suptitle(f"llm bench train: {r0['ranks']} ranks, {r0['precision']}, seq {r0['seq_len']}, micro-batch "
                 f"{r0['micro_batch']} ({r0['device']})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    *,
    models: list[str],
    stages: list[int],
    ranks: int,
    precision: str,
    seq_len: int,
    micro_batch: int,
    warmup: int,
    steps: int,
    modes: list[str],
    out_dir: str | None,
) -> Path:
    """Measure every (model preset, ZeRO stage) on `ranks` local processes, eagerly and/or compiled
    (`train.compile`; the warm-up steps include the compilation); print and write the table."""
    import torch

    from llm.config import find_preset

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for model in models:
        find_preset("models", model, "--models")
        for stage in stages:
            row = {}
            for mode in modes:
                cfg = {"model": model, "stage": stage, "seq_len": seq_len, "micro_batch": micro_batch,
                       "precision": precision, "warmup": warmup, "steps": steps,
                       "compile": mode == "compiled"}  # fmt: skip
                r = run_on_ranks("llm.bench.train:measure", ranks, cfg)[0]
                if not row:
                    row = {"model": model, "params_m": r["params"] / 1e6, "zero": stage, "ranks": ranks,
                           "precision": precision, "seq_len": seq_len, "micro_batch": micro_batch,
                           "peak_tflops_per_rank": r["peak_tflops_per_rank"], "peak_source": r["peak_source"],
                           "device": device}  # fmt: skip
                row.update({f"tokens_per_s_{mode}": r["tokens_per_s"], f"tflops_{mode}": r["tflops"],
                            f"mfu_pct_{mode}": 100 * r["mfu"] if r["mfu"] is not None else None,
                            f"step_ms_{mode}": 1e3 * r["step_s"]})  # fmt: skip
            if "eager" in modes and "compiled" in modes:
                row["compiled_speedup"] = row["step_ms_eager"] / row["step_ms_compiled"]
            # the first mode's figures under the plain names (the plot and older readers use them)
            row.update(tokens_per_s=row[f"tokens_per_s_{modes[0]}"], mfu_pct=row[f"mfu_pct_{modes[0]}"])
            rows.append(row)
            print(format_table([row], columns(modes), HEADERS).splitlines()[-1], flush=True)
    print(format_table(rows, columns(modes), HEADERS, NOTES))
    path = write_results("train", rows, out_dir=out_dir, modes=list(modes), warmup=warmup, steps=steps)
    png = path.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {path} and {png}")
    return path


def columns(modes) -> list[str]:
    out = ["model", "params_m", "zero", "ranks"]
    for mode in modes:
        out += [f"step_ms_{mode}", f"tokens_per_s_{mode}", f"mfu_pct_{mode}"]
    if "eager" in modes and "compiled" in modes:
        out.append("compiled_speedup")
    return out + ["peak_tflops_per_rank"]


HEADERS = {"params_m": "params (M)", "peak_tflops_per_rank": "peak TFLOP/s per rank", "compiled_speedup": "speed-up"}
for _mode in ("eager", "compiled"):
    HEADERS.update({f"step_ms_{_mode}": f"step ms {_mode}", f"tokens_per_s_{_mode}": f"tok/s {_mode}",
                    f"mfu_pct_{_mode}": f"MFU % {_mode}"})  # fmt: skip
NOTES = {
    "tokens_per_s_eager": "tokens of all ranks in one optimizer step / the median step time",
    "mfu_pct_eager": "model FLOPs per token (6 per matmul parameter + attention) x tok/s / (ranks x peak)",
    "tokens_per_s_compiled": "as for eager, with train.compile (DeepSpeedEngine.compile, inductor)",
    "mfu_pct_compiled": "as for eager",
    "compiled_speedup": "step ms eager / step ms compiled (compilation itself is in the warm-up steps, not timed)",
    "peak_tflops_per_rank": "the device table's dense peak on a GPU; a measured fp32 matmul rate on a CPU",
}
