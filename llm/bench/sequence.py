"""`llm bench sequence`: peak memory per rank against sequence length under Ulysses sequence parallelism, and
the longest sequence that fits a memory budget.

Each (sequence-parallel size N, sequence length) point is a fresh `llm.train.Trainer` on N local ranks, one
sequence group reading one synthetic sample per step (ZeRO-0, so the model states are the same at every N and
only the step's own memory changes). After a warm-up step (gradients and Adam's moments exist from then on) the
peak of one more step is measured on every rank: on a GPU `torch.cuda.max_memory_allocated`, on a CPU the
process's peak resident set (VmHWM, reset before the step through /proc/self/clear_refs). "step" is that peak
less what the rank held when the step began: activations, the gradient of the step, the transients. For each N
the lengths double from the first until a step's memory passes the budget; the longest that stayed inside it is
reported. Analytic activations (Korthikanti et al. 2022, divided by N; `llm.models.info`) stand beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm.bench.common import format_table, write_results
from llm.bench.ranks import run_on_ranks
from llm.bench.train import bench_trainer
from llm.log import logger

MIB = 2**20


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(cfg: dict) -> dict:
    """On every rank: bytes held before the measured step, and its peak."""
    with bench_trainer(cfg) as trainer:
        trainer.train_step()  # warm-up: gradients and optimizer state exist from here on
        cuda = trainer.dist.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from now
            before = _resident_bytes("VmRSS")
        trainer.train_step()
        peak = torch.cuda.max_memory_allocated() if cuda else _resident_bytes("VmHWM")
        params = trainer.model.num_parameters()
    return {"before": before, "peak": peak, "params": params}


def analytic_mib(model: str, fields: dict, seq_len: int, sequence: int) -> float:
    """Korthikanti et al.'s stored activations per rank (fused attention: no a s^2 scores), fp32 (2x the
    16-bit figure; the CPU trains in fp32)."""
    from llm.models.config import load_model_config
    from llm.models.info import activation_memory_per_rank

    cfg = load_model_config(model, [f"{k}={v}" for k, v in fields.items()])
    return 2 * activation_memory_per_rank(cfg, seq_len, 1, sequence)["fused"] / MIB


def plot(rows: list[dict], budget_mib: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n in sorted({r["sequence"] for r in rows}):
        sub = [r for r in rows if r["sequence"] == n]
        ax.plot([r["seq_len"] for r in sub], [r["step_mib"] for r in sub], "o-", label=f"sequence-parallel {n}")
    ax.axhline(budget_mib, color="gray", linestyle="--", label=f"budget {budget_mib:.0f} MiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("step memory per rank (MiB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"llm bench sequence: {rows[0]['model']}, rank 0 ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["sequence", "seq_len", "positions_per_rank", "before_mib", "peak_mib", "step_mib", "analytic_mib", "fits"]
HEADERS = {"sequence": "SP", "seq_len": "seq", "positions_per_rank": "positions/rank", "before_mib": "held MiB",
           "peak_mib": "peak MiB", "step_mib": "step MiB", "analytic_mib": "activations MiB"}  # fmt: skip
NOTES = {
    "before_mib": "what rank 0 held when the measured step began (CPU: resident set, libraries included)",
    "peak_mib": "rank 0's peak during the step (GPU: max_memory_allocated; CPU: VmHWM)",
    "step_mib": "peak MiB - held MiB: the step's activations, gradient and transients",
    "analytic_mib": "Korthikanti et al. 2022 stored activations with fused attention, / SP, x2 for fp32",
}


def run(
    *,
    model: str,
    fields: dict,
    sequences: list[int],
    first_seq_len: int,
    max_seq_len: int,
    budget_mib: float,
    png: bool,
    out_dir: str | None,
) -> Path:
    """Measure every sequence-parallel size at doubling lengths until the step's memory passes the budget;
    print and write the table and each size's longest length within the budget."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    gpus = torch.cuda.device_count()
    rows, longest, not_run = [], {}, {}
    for n in sequences:
        if gpus and n > gpus:
            not_run[n] = f"needs {n} GPUs (one rank per GPU), {gpus} here"
            continue
        seq = first_seq_len
        while seq <= max_seq_len:
            cfg = {"model": model, "model_fields": fields, "stage": 0, "seq_len": seq, "micro_batch": 1,
                   "precision": "bf16" if gpus else "fp32", "sequence": n}  # fmt: skip
            r = run_on_ranks("llm.bench.sequence:measure", n, cfg)[0]
            row = {"model": model, "device": device, "sequence": n, "seq_len": seq, "positions_per_rank": -(-seq // n),
                   "before_mib": r["before"] / MIB, "peak_mib": r["peak"] / MIB,
                   "step_mib": (r["peak"] - r["before"]) / MIB, "analytic_mib": analytic_mib(model, fields, seq, n),
                   "params_m": r["params"] / 1e6}  # fmt: skip
            row["fits"] = row["step_mib"] <= budget_mib
            rows.append(row)
            logger.info(f"sequence-parallel {n}, seq {seq}: step {row['step_mib']:.0f} MiB per rank")  # progress
            if not row["fits"]:
                break
            longest[n] = seq
            seq *= 2
    print(format_table(rows, COLUMNS, HEADERS, NOTES))
    for n in sequences:
        if n in not_run:
            print(f"sequence-parallel {n}: not run ({not_run[n]})")
        else:
            print(f"sequence-parallel {n}: longest sequence within {budget_mib:.0f} MiB per rank: {longest.get(n)}")
    longest_json, not_run_json = {str(n): s for n, s in longest.items()}, {str(n): w for n, w in not_run.items()}
    path = write_results("sequence", rows, out_dir=out_dir, budget_mib=budget_mib, model_fields=fields,
                         longest=longest_json, not_run=not_run_json)  # fmt: skip
    if png and rows:
        plot(rows, budget_mib, path.with_suffix(".png"))
    print(f"wrote {path}")
    return path
