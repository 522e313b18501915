"""The training loop over built parts.

`Trainer` is handed a DeepSpeed engine, the model inside it, the task, this
rank's training batches and callbacks (llm.run assembles them from a recipe).
`train_step()` runs one optimizer step (grad_accum micro-batches) and returns
its metrics; `fit()` is the whole run: logging, callbacks at step boundaries,
checkpoints, preemption signals. `evaluate(batches)` gives the task's
validation metrics, averaged over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import sys
import time
from pathlib import Path

import torch

from llm.errors import UserError
from llm.log import logger
from llm.train import checkpoint as ckpt
from llm.train.config import Recipe
from llm.train.distributed import DistInfo, Heartbeat, RankFailure
from llm.train.metrics import MetricsWriter, memory_bytes
from llm.train.parallel import SequenceParallel
from llm.train.tensor_parallel import TensorParallel, grad_norm


def _collective_error(e: BaseException) -> bool:
    """Whether an exception comes from a collective: torch.distributed's own types, or gloo/nccl text."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    text = str(e)
    marks = ("gloo", "nccl", "Connection reset", "Connection closed", "Timed out", "timed out", "timeout", "peer")
    return isinstance(e, kinds) or any(m in text for m in marks)


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf and the recipe says abort (or too many were skipped)."""


class Callback:
    """Hooks at step boundaries; override what you need. `trainer` gives access to everything.

    A callback that learns something during a run keeps it through checkpoints, as torchtitan's
    Stateful components do: `state_dict()` is saved in each checkpoint under the callback's name
    (`name`, else its class name: stable across runs, unique among a trainer's callbacks) and given
    back to `load_state_dict()` on resume. The state holds tensors and plain data only (it is read
    with weights_only=True). Rank 0 saves it once and every rank gets that copy back, on any number
    of ranks; a callback whose state differs between ranks sets `per_rank`: each rank saves and gets
    back its own, and a resume on another number of ranks is refused. Any object with these members
    is a callback (`llm.compress`'s GradualPruner, which may not import the loop, is one)."""

    name: str | None = None
    per_rank = False

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        """After optimizer step `trainer.step` (metrics of that step); before its checkpoint."""

    def on_fit_end(self, trainer: Trainer, preempted: bool) -> None:
        """After the last step, before the final checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Validation(Callback):
    """The task's validation metrics every `every` steps (0: only at the end), logged and written;
    the last of them (`last`, the run's summary) survives a resume."""

    name = "validation"

    def __init__(self, batches, every: int, max_batches: int):
        self.batches, self.every, self.max_batches = batches, every, max_batches
        self.last: dict | None = None

    def on_step_end(self, trainer, metrics):
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.max_steps:
            self.run(trainer)

    def on_fit_end(self, trainer, preempted):
        if not preempted:
            self.run(trainer)

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]

    def run(self, trainer: Trainer) -> None:
        val = trainer.evaluate(self.batches, self.max_batches)
        if val is None:
            return
        self.last = val
        if trainer.writer is not None:
            trainer.writer.write(val)
        others = [(k.removeprefix("val_"), v) for k, v in val.items() if k not in ("step", "val_loss")]
        shown = "".join(f", {name} {v:.2f}" if name == "ppl" else f", {name} {v:.4f}" for name, v in others)
        logger.info(f"step {val['step']}: val loss {val['val_loss']:.4f}{shown}")


def callback_name(callback: Callback) -> str:
    """The key of a callback's state in checkpoints: its `name`, else its class name."""
    return callback.name or type(callback).__name__


class Trainer:
    """Runs the loop; see the module docstring. Its `state_dict()` (counters, data position, the
    callbacks' states) goes into every checkpoint and comes back on resume."""

    def __init__(
        self,
        recipe: Recipe,
        dist: DistInfo,
        engine,
        model: torch.nn.Module,
        task,
        train_batches,
        callbacks: list[Callback] = (),
        flops_per_token: float = 0.0,
        peak_flops: float | None = None,
        sequence: SequenceParallel | None = None,
        tensor: TensorParallel | None = None,
    ):
        self.recipe, self.dist, self.engine, self.model, self.task = recipe, dist, engine, model, task
        self.sequence = sequence  # this rank's sequence-parallel group (its batches are slices), None without
        self.tensor = tensor  # this rank's tensor-parallel group (its ranks read the same batches), None without
        self.rank, self.world_size = dist.rank, dist.world_size
        self.train_batches, self.callbacks = train_batches, list(callbacks)
        names = [callback_name(c) for c in self.callbacks]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two callbacks are named {', '.join(twice)}: set `name` to keep their states apart")
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.run_dir = Path(recipe.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.max_steps = recipe.train.max_steps
        self.step = 0
        self.skipped = 0
        self.resumed_step: int | None = None
        self.writer: MetricsWriter | None = None
        self._stop_signal: str | None = None

    # -- resume -------------------------------------------------------------------------

    def resume(self, resume: str) -> None:
        """ "none", "auto" (the newest intact checkpoint of the run, if any) or a checkpoint path.

        The checkpoint's recipe is compared with this one (`llm.train.recipe_change`): allowed
        changes are logged and take effect (a new lr replaces the saved one), others are refused.
        A checkpoint of another number of ranks is loaded through DeepSpeed's universal format
        (`llm.train.elastic`) when its ZeRO stage shards the optimizer."""
        if resume == "none":
            return
        if resume == "auto":
            if not ckpt.complete_steps(self.ckpt_dir):
                return
            step_dir = ckpt.find_checkpoint(self.ckpt_dir)
        else:
            step_dir = ckpt.find_checkpoint(resume)
        saved = ckpt.trainer_state(step_dir, 0)  # rank 0's: the world size, every callback's state
        saved_world = saved.get("world_size") or len(list(step_dir.glob("trainer_rank_*.pt")))  # older llm: count
        self._check_recipe(step_dir, saved_world, saved["step"])
        self._check_per_rank(step_dir, saved_world, saved.get("callbacks", {}))
        load_dir, kwargs = None, {}
        if saved_world != self.world_size and self.engine.zero_optimization_stage() > 0:
            from llm.train import elastic

            load_dir = elastic.universal_copy(step_dir, self.rank)
            kwargs = elastic.load_kwargs(self.engine)
        state = ckpt.load(self.engine, step_dir, self.rank, load_dir, **kwargs)
        if load_dir is not None:
            from llm.train import elastic

            elastic.after_load(self.engine, load_dir)
        # every callback's state from rank 0's file, a per-rank one's from this rank's own
        self.load_state_dict({**state, "callbacks": {**saved.get("callbacks", {}), **state.get("callbacks", {})}})
        self.resumed_step = self.step
        self._apply_lr()
        logger.info(f"resumed from {step_dir} at step {self.step}")

    def _check_recipe(self, step_dir: Path, saved_world: int, saved_step: int) -> None:
        """Compare the checkpoint's recipe with ours (see `resume`)."""
        import yaml

        from llm.config import load_yaml
        from llm.train import recipe_change

        saved_path = step_dir / "recipe.yaml"
        if not saved_path.is_file():
            return
        saved = self.recipe.as_recorded(load_yaml(saved_path))
        current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(self.recipe), sort_keys=False))
        changed = recipe_change.check_resume(saved, current, str(step_dir), saved_world, self.world_size)
        for field, (old, new) in changed.items():
            if field != "run_dir":
                logger.info(f"resume: {field} changed from {old!r} to {new!r} (takes effect from step {saved_step})")

    def _check_per_rank(self, step_dir: Path, saved_world: int, saved_callbacks: dict) -> None:
        """A callback's per-rank state resumes only on the number of ranks that saved it."""
        if saved_world == self.world_size:
            return
        for callback in self.callbacks:
            name = callback_name(callback)
            if callback.per_rank and name in saved_callbacks:
                raise UserError(
                    f"{step_dir}: saved by {saved_world} ranks; callback {name!r} keeps a state per rank, "
                    f"which cannot be restored on {self.world_size} (resume on {saved_world} ranks)"
                )

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint (`checkpoint.save` adds the RNG states): the step, the
        skipped micro-batches, the world size, the data position (global, the same on every rank)
        and the callbacks' states by name: rank 0 saves every callback's, the other ranks those of
        callbacks whose state differs per rank (see `Callback`)."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "world_size": self.world_size,
            "data": self.train_batches.state_dict(),
            "callbacks": {callback_name(c): c.state_dict() for c in self.callbacks if self.rank == 0 or c.per_rank},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s parts; `callbacks` holds every callback's state for this rank. A
        callback the checkpoint has no state for (one added since, or a checkpoint of an older llm)
        starts afresh, and a saved state no callback of this run claims is left unused; both are logged."""
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.train_batches.load_state_dict(state["data"])
        saved = state.get("callbacks", {})
        for callback in self.callbacks:
            name = callback_name(callback)
            if name in saved:
                callback.load_state_dict(saved[name])
            else:
                logger.info(f"resume: the checkpoint holds no state of callback {name!r}; it starts afresh")
        for name in sorted(saved.keys() - {callback_name(c) for c in self.callbacks}):
            logger.warning(f"resume: the checkpoint holds the state of a callback {name!r} this run does not have")

    def _apply_lr(self) -> None:
        """Peak lr of this recipe (not the checkpoint's) from the restored step on."""
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if scheduler is None or not hasattr(scheduler, "base_lrs"):
            return
        scheduler.base_lrs = [self.recipe.optim.lr for _ in scheduler.base_lrs]
        for group, lr_lambda, base in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
            group["lr"] = base * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]

    # -- one step -----------------------------------------------------------------------

    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict) -> torch.Tensor:
        return self.engine(**batch).loss

    def _micro_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Forward one micro-batch whose loss is finite on every rank; skips (or aborts on) the others,
        drawing the next micro-batch in place of a skipped one. Returns (mean loss, the batch used)."""
        import torch.distributed as dist

        consecutive = 0
        while True:
            batch = self._to_device(batch)
            loss = self._forward(batch)
            (bad,) = self._all_reduce([0.0 if torch.isfinite(loss.detach()).item() else 1.0], dist.ReduceOp.MAX)
            if not bad:
                return loss, batch
            self.skipped += 1
            consecutive += 1
            where = f"step {self.step + 1}"
            t = self.recipe.train
            if t.non_finite == "abort":
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at {where}; train.non_finite is 'abort'")
            if consecutive > t.max_skips:
                raise NonFiniteLoss(
                    f"{consecutive} non-finite losses in a row at {where} (train.max_skips={t.max_skips})"
                )
            logger.warning(f"non-finite loss at {where}, micro-batch skipped ({self.skipped} so far)")
            batch = self.train_batches.next_batch()

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; its loss is the mean over every loss
        token (label not ignored) of all its micro-batches on all ranks.

        The models return a mean per micro-batch; DeepSpeed divides by grad_accum and averages
        over ranks. So micro-batch i, with n_i of the step's N loss tokens, is back-propagated as
        mean_i * n_i * grad_accum * world_size / N: the step's gradient is that of sum(losses) / N,
        the same as one batch holding every sample (a skipped micro-batch's replacement is
        weighted by its own count; the micro-batches before it keep the step's first N). Under sequence
        parallelism a rank's micro-batch is its slice of its group's samples, and its gradient a part of
        theirs (llm.train.parallel): the same weights make the step's gradient exact. The ranks of a tensor group
        read the same samples, so N counts each token once per rank, and DeepSpeed, which averages over the
        data-parallel ranks only (llm.train.tensor_parallel), finds the same mean."""
        self.engine.train()
        start = time.perf_counter()
        gas = self.recipe.train.grad_accum
        batches = [self.train_batches.next_batch() for _ in range(gas)]
        counts = [self.task.loss_tokens(b) for b in batches]
        (total,) = self._all_reduce([float(sum(counts))])
        loss_sum, tokens, grad_norm = 0.0, 0, None
        for i, batch in enumerate(batches):
            loss, used = self._micro_loss(batch)
            n = self.task.loss_tokens(used) if used is not batch else counts[i]
            weight = n * gas * self.world_size / max(total, 1.0)
            self.engine.backward(loss * weight if weight != 1.0 else loss)
            if i == gas - 1:
                grad_norm = self._grad_norm()
            self.engine.step()
            loss_sum += loss.detach().float().item() * n
            tokens += self.task.tokens(used, self.model.config)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        loss_all, tokens_all = self._all_reduce([loss_sum, float(tokens)])
        loss = loss_all / max(total, 1.0)
        tokens_per_s = tokens_all / (self.tensor.size if self.tensor else 1) / elapsed  # a tensor group's once
        flops = self.flops_per_token * tokens_per_s
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = reported.item() if isinstance(reported, torch.Tensor) else reported
        return {
            "step": self.step,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "tflops": flops / 1e12,
            "mfu": flops / (self.peak_flops * self.world_size) if self.peak_flops else None,
            "memory": memory_bytes(self.dist.device),
            "skipped": self.skipped,
            "step_time_s": elapsed,
        }

    @torch.no_grad()
    def _grad_norm(self) -> float | None:
        """The global L2 norm of the step's gradient before clipping, where DeepSpeed keeps none:
        ZeRO-0 leaves the averaged gradients in `.grad` after the last backward of a step, and
        DeepSpeed's ZeRO-0 path does not record their norm (stages 1-3 report their own)."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        return grad_norm(params, self.tensor) if params else None

    @torch.no_grad()
    def evaluate(self, batches, max_batches: int) -> dict | None:
        """The task's metrics over up to `max_batches` micro-batches per rank of `batches`, from their
        start each time (the same held-out samples), summed over ranks; None when there are none."""
        if batches is None:
            return None
        self.engine.eval()
        batches.rewind()
        sums: dict[str, float] = {}
        for _ in range(max_batches):
            batch = batches.next_batch()
            if batch is None:
                break
            batch = self._to_device(batch)
            output = self.engine(**batch)
            if self.sequence is not None:  # the loss of the group's samples, not of this rank's slice of them
                output.loss = self.sequence.mean(output.loss, self.task.loss_tokens(batch))
            counted = self.tensor is None or self.tensor.rank == 0  # a tensor group's batch once
            for key, value in self.task.eval_sums(batch, output).items():
                sums[key] = sums.get(key, 0.0) + (value if counted else 0.0)
        keys = sorted(sums)
        totals = dict(zip(keys, self._all_reduce([sums[k] for k in keys]))) if keys else {}
        self.engine.train()
        if not totals.get("batches"):
            return None
        return {"step": self.step, **self.task.eval_metrics(totals)}

    def save(self) -> Path:
        return ckpt.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            self.state_dict(),
            {"recipe": dataclasses.asdict(self.recipe), "model": self.model.description()},
            self.rank,
            self.recipe.checkpoint.keep_last,
            self.resumed_step,
        )

    # -- the run ------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name
        heartbeat = getattr(self, "heartbeat", None)
        gone = heartbeat.gone_rank() if heartbeat is not None else None
        if gone is not None:  # a launcher ending the job because a rank died: say which before it kills us
            logger.error(f"{heartbeat.describe(gone[0])} is lost: {gone[1]}; rank {self.rank} on {heartbeat.host} ends")
            for handler in logger.handlers:
                handler.flush()

    def _stop_agreed(self) -> bool:
        import torch.distributed as dist

        (flag,) = self._all_reduce([1.0 if self._stop_signal else 0.0], dist.ReduceOp.MAX)
        return bool(flag)

    def fit(self) -> dict:
        """Train to max_steps (or until SIGTERM/SIGUSR1); returns a summary of the run."""
        recipe, t = self.recipe, self.recipe.train
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        heartbeat = Heartbeat(self.run_dir, self.rank, self.world_size, recipe.faults.heartbeat_timeout_s).start()
        self.heartbeat = heartbeat
        self.writer = MetricsWriter.for_recipe(recipe) if self.rank == 0 else None
        bar = self._progress_bar()
        first_loss = last = None
        preempted = False
        started, first_step = time.perf_counter(), self.step
        stack = contextlib.ExitStack()
        if bar is not None:  # log lines (validation, checkpoints) go above the bar, never glued to it
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm(loggers=[logger]))
        try:
            while self.step < t.max_steps:
                metrics = self.train_step()
                first_loss = metrics["loss"] if first_loss is None else first_loss
                last = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}",
                        mfu=f"{(metrics['mfu'] or 0) * 100:.1f}%",
                    )
                if self.writer is not None and (self.step % t.log_every == 0 or self.step in (1, t.max_steps)):
                    self.writer.write(metrics)
                    if bar is None:
                        elapsed = time.perf_counter() - started
                        eta = elapsed / (self.step - first_step) * (t.max_steps - self.step)
                        logger.info(self._log_line(metrics, t.max_steps, elapsed, eta))
                for callback in self.callbacks:
                    callback.on_step_end(self, metrics)
                every = recipe.checkpoint.every_steps
                if every and self.step % every == 0 and self.step < t.max_steps:
                    self.save()
                if self._stop_agreed():
                    preempted = True
                    logger.info(f"{self._stop_signal or 'signal'} received: checkpoint at step {self.step}, then exit")
                    self.save()
                    break
            for callback in self.callbacks:
                callback.on_fit_end(self, preempted)
            if not preempted and recipe.checkpoint.save_final:
                self.save()
        except RuntimeError as e:  # torch.distributed's errors (timeouts, a peer's closed connection) among them
            if self.world_size == 1 or not _collective_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\[[^\]]*\] ", "", first).split(". This is typically")[0][:160]  # gloo's source location
            raise RankFailure(
                f"a collective failed at step {self.step + 1} ({first}); {heartbeat.diagnose()}; "
                f"rank {self.rank} on {heartbeat.host} ends the job"
            ) from None
        finally:
            stack.close()
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
            heartbeat.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {
            "steps": self.step,
            "first_loss": first_loss,
            "last_loss": last["loss"] if last else None,
            "preempted": preempted,
            "skipped": self.skipped,
            "wall_s": time.perf_counter() - started,
        }

    def _progress_bar(self):
        if self.rank != 0 or not self.recipe.logging.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.recipe.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    @staticmethod
    def _log_line(m: dict, max_steps: int, elapsed_s: float, eta_s: float) -> str:
        """One step's line for logs without a progress bar (SLURM, files): the step of max_steps, loss, lr,
        throughput, MFU, time since this run (or resume) started and the estimated time left."""
        mfu = f", mfu {m['mfu'] * 100:.2f}%" if m.get("mfu") is not None else ""
        return (
            f"step {m['step']}/{max_steps}: loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['tokens_per_s']:.0f} tok/s"
            f"{mfu}, elapsed {_clock(elapsed_s)}, eta {_clock(eta_s)}"
        )


def _clock(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour)."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
