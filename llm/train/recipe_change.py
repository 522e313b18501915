"""What a resumed run may change in its recipe.

A checkpoint carries the recipe it was trained with. On resume, fields that only
steer the rest of the run (learning rate, schedule length, max_steps, logging,
checkpoint cadence, evaluation, fault timeouts, kernels, where the run lives)
take effect and are logged; the per-rank batch split and the parallel sizes may
change when the global batch stays the same (another number of ranks: the model
state and the data position do not depend on them). Anything else (the model, data,
seed, optimizer's other settings, precision, ZeRO stage) would silently make a
different run out of the saved state, so it is one ConfigError naming the field.
"""

from __future__ import annotations

from llm.config import ConfigError

# dotted prefixes of fields that may differ from the checkpoint's recipe
MUTABLE = (
    "run_dir",
    "init_from",
    "optim.lr",
    "schedule.",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.non_finite",
    "train.max_skips",
    "train.compile",
    "train.activation_checkpointing",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    "parallel.",
    "logging.",
    "checkpoint.",
    "faults.",
    "kernels",
)


def flatten(value, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested mapping (lists are leaves)."""
    if isinstance(value, dict) and value:
        out = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def mutable(field: str) -> bool:
    return any(field == m or field.startswith(m if m.endswith(".") else m + ".") for m in MUTABLE)


def changes(saved: dict, current: dict) -> dict[str, tuple]:
    """{field: (saved value, current value)} of every field that differs."""
    old, new = flatten(saved), flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check(saved: dict, current: dict, where: str) -> dict[str, tuple]:
    """The allowed changes; ConfigError naming the first field that may not change on resume."""
    found = changes(saved, current)
    for field, (old, new) in found.items():
        if not mutable(field):
            raise ConfigError(
                field,
                f"is {new!r} but the checkpoint {where} was trained with {old!r}; this field cannot change "
                f"on resume (start a new run, or resume with the checkpoint's value)",
            )
    return found


def data_ranks(recipe: dict, world_size: int) -> int:
    """The data-parallel ranks among `world_size` (world = data x sequence x tensor, llm.train.parallel)."""
    parallel = recipe.get("parallel") or {}
    return max(1, world_size // (parallel.get("sequence", 1) * parallel.get("tensor", 1)))


def global_batch(recipe: dict, world_size: int) -> int:
    t = recipe["train"]
    return t["micro_batch_size"] * t["grad_accum"] * data_ranks(recipe, world_size)


def check_tensor_parallel(saved: dict, current: dict, where: str, saved_world: int | None, world_size: int) -> None:
    """A tensor-parallel checkpoint holds each rank's part of every block, and its ZeRO states are sharded
    per tensor rank: it resumes with its parallel.tensor on its number of ranks (ConfigError otherwise); its
    export, or `init_from` of it, holds the whole model for any other layout."""
    before, now = ((r.get("parallel") or {}).get("tensor", 1) for r in (saved, current))
    if before != now:
        raise ConfigError(
            "parallel.tensor",
            f"is {now} but the checkpoint {where} was trained with {before}; resume with parallel.tensor={before}, "
            "or start a new run from it with init_from",
        )
    if now > 1 and saved_world is not None and saved_world != world_size:
        raise ConfigError(
            "parallel.tensor",
            f"{now}: the tensor-parallel checkpoint {where} resumes on the {saved_world} ranks it was saved by, not "
            f"{world_size}; or start a new run from it with init_from",
        )


def check_resume(saved: dict, current: dict, where: str, saved_world: int | None, world_size: int) -> dict:
    """`check`, and the global batch: `world_size` ranks must train with the checkpoint's global batch
    (`saved_world` ranks; None: not recorded). Returns the allowed changes; ConfigError otherwise."""
    changed = check(saved, current, where)
    check_tensor_parallel(saved, current, where, saved_world, world_size)
    if saved_world is not None:
        before, now = global_batch(saved, saved_world), global_batch(current, world_size)
        if before != now:
            ranks, saved_ranks = data_ranks(current, world_size), data_ranks(saved, saved_world)
            raise ConfigError(
                "train.grad_accum",
                f"global batch {now} (micro_batch_size x grad_accum x {ranks} data-parallel ranks) differs from the "
                f"checkpoint's {before} ({saved_ranks} data-parallel ranks); set train.grad_accum or "
                "micro_batch_size to keep it",
            )
    return changed
