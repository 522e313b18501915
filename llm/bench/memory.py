"""`llm bench memory`: measured per-rank bytes of weights, gradients and optimizer state under ZeRO 0-3.

Each rank builds the Trainer's DeepSpeed engine for one ZeRO stage, runs a forward and backward
(gradients measured then, before the step frees or reuses them) and an optimizer step (weights and
optimizer state measured after it, once Adam's moments exist). Bytes are counted from the engine's
actual tensors, each underlying storage once:

- weights: the model's parameters as the rank holds them (ZeRO-3: the `ds_tensor` partitions);
- grads: the parameters' `.grad` and the ZeRO optimizer's gradient buffers (averaged or
  partitioned gradients, the bf16 optimizer's fp32 gradient accumulators);
- optimizer: the inner optimizer's fp32 master weights (where they are a copy) and Adam's moments.

The analytic figure is `llm.models.info.zero_memory_per_rank` (mixed precision: 2 + 2 + 12 bytes
per parameter, sharded by stage); for fp32 training it is 4 + 4 + 8 (no separate master copy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm.bench.common import format_table, write_results
from llm.bench.ranks import run_on_ranks
from llm.bench.train import bench_trainer

# Attributes of DeepSpeed's ZeRO / bf16 optimizers that hold gradients between backward and step.
GRAD_BUFFERS = (
    "averaged_gradients",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "fp32_groups_gradients_flat",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
)
# ... and those that hold the rank's (possibly partitioned) low-precision weights.
WEIGHT_BUFFERS = ("bit16_groups_flat", "fp16_partitioned_groups_flat", "bf16_groups_flat")
# ... and their fp32 master partitions (ZeRO-3 hands them to the inner optimizer only during its step).
MASTER_BUFFERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _tensors(obj):
    """Tensors inside nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class StorageCounter:
    """Bytes of distinct storages; a storage already counted (in any category) is not counted again."""

    def __init__(self):
        self.seen: set[int] = set()

    def add(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0 or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def _inner_optimizer(engine):
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _weight_tensors(engine):
    for p in engine.module.parameters():
        yield getattr(p, "ds_tensor", None)
        yield p.data
    for name in WEIGHT_BUFFERS:
        yield from _tensors(getattr(engine.optimizer, name, None))


def measure(cfg: dict) -> dict:
    """On every rank: bytes of weights, grads and optimizer state held by this rank."""
    with bench_trainer(cfg) as trainer:
        engine = trainer.engine
        batch = trainer._to_device(trainer.train_batches.next_batch())
        engine.backward(engine(**batch).loss)

        # Gradients, before the step consumes them; weights are marked first so a gradient
        # buffer that aliases them is not taken for a gradient.
        weights_before = StorageCounter()
        weights_before.add(_weight_tensors(engine))
        grad_counter = StorageCounter()
        grad_counter.seen = set(weights_before.seen)
        grads = grad_counter.add(p.grad for p in engine.module.parameters())
        for name in GRAD_BUFFERS:
            grads += grad_counter.add(_tensors(getattr(engine.optimizer, name, None)))
        engine.step()

        counter = StorageCounter()
        weights = counter.add(_weight_tensors(engine))
        opt = _inner_optimizer(engine)
        master = counter.add(p for group in opt.param_groups for p in group["params"])
        for name in MASTER_BUFFERS:
            master += counter.add(_tensors(getattr(engine.optimizer, name, None)))
        moments = counter.add(t for state in opt.state.values() for t in state.values() if t.numel() > 1)
        params = trainer.model.num_parameters()
    return {
        "params": params,
        "weights": weights,
        "grads": grads,
        "master": master,
        "moments": moments,
        "optimizer": master + moments,
        "optimizer_class": f"{type(engine.optimizer).__name__}/{type(opt).__name__}",
    }


def analytic(n_params: int, ranks: int, stage: int, precision: str) -> dict[str, float]:
    from llm.models.info import zero_memory_per_rank

    if precision in ("bf16", "fp16"):
        return zero_memory_per_rank(n_params, ranks, stage)
    # fp32: 4 bytes of weights, 4 of gradients, 8 of Adam moments (the weights are the master copy)
    weights = 4 * n_params / (ranks if stage >= 3 else 1)
    grads = 4 * n_params / (ranks if stage >= 2 else 1)
    optimizer = 8 * n_params / (ranks if stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "total": weights + grads + optimizer}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank_counts = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(1, len(rank_counts), figsize=(5.5 * len(rank_counts), 4), squeeze=False)
    colors = {"weights": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
    for ax, ranks in zip(axes[0], rank_counts):
        sub = [r for r in rows if r["ranks"] == ranks]
        for i, r in enumerate(sub):
            bottom_m = bottom_a = 0.0
            for part, color in colors.items():
                m, a = r[f"{part}_mib"], r[f"{part}_analytic_mib"]
                ax.bar(i - 0.2, m, 0.4, bottom=bottom_m, color=color, label=part if i == 0 else None)
                ax.bar(i + 0.2, a, 0.4, bottom=bottom_a, color=color, alpha=0.4, hatch="//")
                bottom_m += m
                bottom_a += a
        ax.set_xticks(range(len(sub)), [f"ZeRO-{r['zero']}" for r in sub])
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{ranks} ranks: measured (solid) vs analytic (hatched)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"llm bench memory: {r0['model']} ({r0['params_m']:.2f} M params), {r0['precision']}, rank 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["model", "zero", "ranks", "precision", "weights_mib", "weights_analytic_mib", "grads_mib",
           "grads_analytic_mib", "optimizer_mib", "optimizer_analytic_mib", "total_mib", "total_analytic_mib",
           "bytes_per_param"]  # fmt: skip


NOTES = {
    "weights_analytic_mib": "parameters x bytes per element (2 in bf16/fp16, 4 in fp32), divided by the ranks "
    "under ZeRO-3",
    "grads_analytic_mib": "parameters x gradient bytes, divided by the ranks under ZeRO-2 and -3",
    "optimizer_analytic_mib": "parameters x 12 bytes (fp32 master copy + Adam's two moments; 8 in fp32 training), "
    "divided by the ranks under ZeRO-1, -2, -3 (Rajbhandari et al. 2020, ZeRO, table 1)",
    "total_analytic_mib": "the sum of the three analytic columns",
    "bytes_per_param": "measured total MiB x 2**20 / parameters (16 bytes/param unsharded in mixed precision)",
}


def run(
    *, model: str, stages: list[int], ranks_list: list[int], precision: str, seq_len: int, out_dir: str | None
) -> Path:
    """Measure every (rank count, ZeRO stage) for the model preset `model`; print and write the table."""
    mib = 2**20
    rows = []
    for ranks in ranks_list:
        for stage in stages:
            cfg = {"model": model, "stage": stage, "seq_len": seq_len, "micro_batch": 1,
                   "precision": precision}  # fmt: skip
            per_rank = run_on_ranks("llm.bench.memory:measure", ranks, cfg)
            r = per_rank[0]
            ref = analytic(r["params"], ranks, stage, precision)
            total = r["weights"] + r["grads"] + r["optimizer"]
            row = {"model": model, "params_m": r["params"] / 1e6, "zero": stage, "ranks": ranks,
                   "precision": precision}  # fmt: skip
            for part, value in (("weights", r["weights"]), ("grads", r["grads"]), ("optimizer", r["optimizer"]),
                                ("total", total)):  # fmt: skip
                row[f"{part}_mib"] = value / mib
                row[f"{part}_analytic_mib"] = ref[part] / mib
            row["master_mib"], row["moments_mib"] = r["master"] / mib, r["moments"] / mib
            row["bytes_per_param"] = total / r["params"]
            row["optimizer_class"] = r["optimizer_class"]
            row["total_mib_per_rank"] = [(x["weights"] + x["grads"] + x["optimizer"]) / mib for x in per_rank]
            rows.append(row)
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    print(format_table(rows, COLUMNS, notes=NOTES))
    path = write_results("memory", rows, out_dir=out_dir)
    png = path.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {path} and {png}")
    return path
