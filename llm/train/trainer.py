"""The training loop on a DeepSpeed engine.

`Trainer(recipe)` checks the recipe against the world it runs in (batch
arithmetic, ZeRO options) before anything heavy starts, builds the model and the
engine, and restores a checkpoint when asked. `train_step()` runs one optimizer
step (grad_accum micro-batches) and returns its metrics; `fit()` is the whole
run: logging, validation, checkpoints, preemption signals.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llm.config import ConfigError, RecipeConfig, config_to_dict
from llm.errors import UserError
from llm.train import checkpoint as ckpt
from llm.train.distributed import DistInfo, Heartbeat, init_distributed
from llm.train.metrics import MetricsWriter, device_peak_flops, memory_bytes
from llm.train.schedule import lr_scheduler, optimizer_json, param_groups

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
LM_TASKS = ("causal_lm", "pretraining", "masked_lm")


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf and the recipe says abort (or too many were skipped)."""


# ----------------------------------------------------------------------------
# Checks and the DeepSpeed JSON, before any engine exists
# ----------------------------------------------------------------------------


def check_batch(recipe: RecipeConfig, world_size: int) -> int:
    """global = micro x accumulation x data-parallel ranks; returns the global batch."""
    t = recipe.train
    product = t.micro_batch_size * t.grad_accum * world_size
    if t.global_batch_size is not None and t.global_batch_size != product:
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} != micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} "
            f"x {world_size} ranks = {product}",
        )
    if recipe.model.task == "contrastive" and t.micro_batch_size < 2:
        raise ConfigError("train.micro_batch_size", "contrastive training needs >= 2 pairs per micro-batch")
    return product


def load_preset(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
        raise ConfigError("deepspeed.preset", f"{name!r} is neither a file nor a preset (known: {known})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed.preset", f"{path}: not valid JSON ({e})") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(recipe: RecipeConfig, world_size: int) -> dict:
    """The preset, then the recipe's batch, precision, clipping, ZeRO and optimizer, then deepspeed.config."""
    ds, t = recipe.deepspeed, recipe.train
    cfg = load_preset(ds.preset)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    stage = zero.get("stage", 0)
    if ds.offload_optimizer:
        if stage < 1:
            raise ConfigError("deepspeed.offload_optimizer", f"needs ZeRO stage >= 1, got stage {stage}")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        if stage != 3:
            raise ConfigError("deepspeed.offload_params", f"needs ZeRO stage 3, got stage {stage}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=check_batch(recipe, world_size),
        gradient_clipping=t.grad_clip,
        optimizer=optimizer_json(recipe.optim, offload=ds.offload_optimizer),
    )
    cfg["bf16"] = {"enabled": t.precision == "bf16"}
    cfg["fp16"] = {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 100}
    cfg = _merge(cfg, ds.config)
    stage = cfg["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.config.zero_optimization.stage", f"must be 0-3, got {stage}")
    return cfg


# ----------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """A DeepSpeed engine with its data, metrics and checkpoints. See the module docstring."""

    def __init__(self, recipe: RecipeConfig, resume: str = "none", dist_info: DistInfo | None = None):
        self.recipe = recipe
        self.dist = dist_info or init_distributed(recipe.faults.collective_timeout_s)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.global_batch = check_batch(recipe, self.world_size)
        ds_json = deepspeed_config(recipe, self.world_size)  # every field checked before the engine
        self.run_dir = Path(recipe.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if recipe.kernels:
            from llm.kernels import configure

            try:
                configure(recipe.kernels)
            except (ValueError, KeyError) as e:
                raise ConfigError("kernels", str(e)) from None
        seed_everything(recipe.seed)
        from llm.train.data import make_source, prepare_if_missing

        prepare_if_missing(recipe, self.rank)
        self.train_data = make_source(recipe, self.rank, self.world_size, "train")
        self.val_data = make_source(recipe, self.rank, self.world_size, "val")

        import deepspeed

        model = self._build_model()
        self.model = model
        engine_model = torch.compile(model) if recipe.train.compile else model
        self.engine, *_ = deepspeed.initialize(
            model=engine_model,
            model_parameters=param_groups(model, recipe.optim.weight_decay),
            config=ds_json,
            lr_scheduler=lr_scheduler(recipe.schedule, recipe.train.max_steps),
        )
        self.ds_config = ds_json
        self.step = 0
        self.skipped = 0
        self._stop_signal: str | None = None
        self.flops_per_token = self._flops_per_token()
        self.peak_flops, self.peak_source = device_peak_flops(self.dist.device, recipe.train.precision)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(self.recipe_yaml())
        self._resume(resume)

    # -- set-up -------------------------------------------------------------------------

    def recipe_dict(self) -> dict:
        return config_to_dict(self.recipe)

    def recipe_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.recipe_dict(), sort_keys=False)

    def _build_model(self):
        from llm.models import build_model

        recipe = self.recipe
        model = build_model(recipe.model)
        if recipe.init_from:
            self._load_initial_weights(model, recipe.init_from)
        if recipe.train.activation_checkpointing:
            model.set_gradient_checkpointing(True)
        return model.to(self.dist.device)

    def _load_initial_weights(self, model, path: str) -> None:
        source = Path(path)
        if (source / ckpt.LATEST).is_file() or (source / ckpt.COMPLETE).is_file():
            init = ckpt.load_model_from_checkpoint(source)
        else:
            try:
                from llm.models.io import load_model
            except ImportError:
                raise UserError(f"init_from: {path}: not a checkpoint, and llm.models.io is not available") from None
            init = load_model(source)
        own = model.state_dict()
        state = init.state_dict()
        for key, tensor in state.items():
            if key in own and own[key].shape != tensor.shape:
                raise ConfigError(
                    "init_from",
                    f"{path}: {key} has shape {tuple(tensor.shape)}, the recipe's model needs {tuple(own[key].shape)}",
                )
        result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if result.missing_keys and self.rank == 0:
            print(f"llm: init_from {path}: freshly initialised: {', '.join(result.missing_keys)}", file=sys.stderr)

    def _flops_per_token(self) -> float:
        from llm.models.info import training_flops_per_token

        cfg = self.recipe.model
        seq = cfg.seq_len if cfg.is_image else self.recipe.data.seq_len
        return training_flops_per_token(cfg, seq)

    def _resume(self, resume: str) -> None:
        if resume == "none":
            return
        if resume == "auto":
            if not self.ckpt_dir.is_dir():
                return
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                steps = ckpt.complete_steps(self.ckpt_dir)
            if self.rank == 0:
                for w in caught:
                    print(f"llm: warning: {w.message}", file=sys.stderr)
            if not steps:
                return
            step_dir = ckpt.find_checkpoint(self.ckpt_dir)
        else:
            step_dir = ckpt.find_checkpoint(resume)
        state = ckpt.load(self.engine, step_dir, self.rank)
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.train_data.load_state_dict(state["data"])
        if self.rank == 0:
            print(f"llm: resumed from {step_dir} at step {self.step}", file=sys.stderr)

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

    def _micro_loss(self) -> tuple[torch.Tensor, int]:
        """Forward one micro-batch whose loss is finite on every rank; skips (or aborts on) the others."""
        import torch.distributed as dist

        consecutive = 0
        while True:
            batch = self._to_device(self.train_data.next_batch())
            loss = self._forward(batch)
            (bad,) = self._all_reduce([0.0 if torch.isfinite(loss.detach()).item() else 1.0], dist.ReduceOp.MAX)
            if not bad:
                return loss, self.train_data.tokens(batch)
            self.skipped += 1
            consecutive += 1
            where = f"step {self.step + 1}"
            if self.recipe.train.non_finite == "abort":
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at {where}; train.non_finite is 'abort'")
            if consecutive > self.recipe.train.max_skips:
                raise NonFiniteLoss(
                    f"{consecutive} non-finite losses in a row at {where} "
                    f"(train.max_skips={self.recipe.train.max_skips})"
                )
            if self.rank == 0:
                print(
                    f"llm: warning: non-finite loss at {where}, micro-batch skipped ({self.skipped} so far)",
                    file=sys.stderr,
                )

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; metrics of the step (loss averaged over ranks)."""
        self.engine.train()
        start = time.perf_counter()
        total_loss, tokens = 0.0, 0
        for _ in range(self.recipe.train.grad_accum):
            loss, n = self._micro_loss()
            self.engine.backward(loss)
            self.engine.step()
            total_loss += loss.detach().float().item()
            tokens += n
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        loss_sum, tokens_all = self._all_reduce([total_loss, float(tokens)])
        loss = loss_sum / (self.recipe.train.grad_accum * self.world_size)
        tokens_per_s = tokens_all / elapsed
        flops = self.flops_per_token * tokens_per_s
        grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.item()
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
    def evaluate(self) -> dict | None:
        """Mean loss over eval_batches micro-batches per rank of the validation split (and perplexity for LMs)."""
        if self.val_data is None:
            return None
        self.engine.eval()
        self.val_data.load_state_dict({"epoch": 0, "consumed": 0})  # the same held-out samples every time
        total, count = 0.0, 0
        for _ in range(self.recipe.train.eval_batches):
            batch = self.val_data.next_batch()
            if batch is None:
                break
            loss = self._forward(self._to_device(batch))
            total += loss.float().item()
            count += 1
        total, count = self._all_reduce([total, float(count)])
        self.engine.train()
        if not count:
            return None
        loss = total / count
        out = {"step": self.step, "val_loss": loss}
        if self.recipe.model.task in LM_TASKS:
            out["val_ppl"] = math.exp(min(loss, 50.0))
        return out

    def save(self) -> Path:
        state = {"data": self.train_data.state_dict(), "skipped": self.skipped}
        return ckpt.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            state,
            self.recipe_dict(),
            self.rank,
            self.recipe.checkpoint.keep_last,
        )

    # -- the run ------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _stop_agreed(self) -> bool:
        import torch.distributed as dist

        (flag,) = self._all_reduce([1.0 if self._stop_signal else 0.0], dist.ReduceOp.MAX)
        return bool(flag)

    def fit(self) -> dict:
        """Train to max_steps (or until SIGTERM/SIGUSR1); returns a summary of the run."""
        recipe, t = self.recipe, self.recipe.train
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        heartbeat = Heartbeat(self.run_dir, self.rank, self.world_size, recipe.faults.heartbeat_timeout_s).start()
        writer = MetricsWriter(self.run_dir, recipe.logging.tensorboard) if self.rank == 0 else None
        bar = self._progress_bar()
        first_loss = last = None
        last_val = None
        preempted = False
        started = time.perf_counter()
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
                if writer is not None and (self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1):
                    writer.write(metrics)
                    if bar is None:
                        print(self._log_line(metrics), file=sys.stderr, flush=True)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    last_val = self._validate(writer)
                every = recipe.checkpoint.every_steps
                if every and self.step % every == 0 and self.step < t.max_steps:
                    self.save()
                if self._stop_agreed():
                    preempted = True
                    if self.rank == 0:
                        print(
                            f"llm: {self._stop_signal or 'signal'} received: checkpoint at step {self.step}, then exit",
                            file=sys.stderr,
                        )
                    self.save()
                    break
            if not preempted:
                last_val = self._validate(writer) or last_val
                if recipe.checkpoint.save_final:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            heartbeat.stop()
        return {
            "steps": self.step,
            "first_loss": first_loss,
            "last_loss": last["loss"] if last else None,
            "val": last_val,
            "preempted": preempted,
            "skipped": self.skipped,
            "wall_s": time.perf_counter() - started,
        }

    def _validate(self, writer) -> dict | None:
        val = self.evaluate()
        if val is not None and self.rank == 0:
            if writer is not None:
                writer.write(val)
            ppl = f", ppl {val['val_ppl']:.2f}" if "val_ppl" in val else ""
            print(f"llm: step {val['step']}: val loss {val['val_loss']:.4f}{ppl}", file=sys.stderr, flush=True)
        return val

    def _progress_bar(self):
        if self.rank != 0 or not self.recipe.logging.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.recipe.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    @staticmethod
    def _log_line(m: dict) -> str:
        mfu = f", mfu {m['mfu'] * 100:.2f}%" if m.get("mfu") is not None else ""
        return f"llm: step {m['step']}: loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['tokens_per_s']:.0f} tok/s{mfu}"
