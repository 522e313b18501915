"""`llm pretrain` / `llm finetune` / `llm eval` as library calls."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from llm.config import RecipeConfig
from llm.models.io import load_pretrained, save_pretrained
from llm.train import checkpoint as ckpt


def pretrain(recipe: RecipeConfig, resume: str = "none") -> dict:
    """Train a recipe to its end; on rank 0 export the final model and print a sample when asked."""
    from llm.train.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(recipe, resume=resume)
    summary = trainer.fit()
    if trainer.rank == 0 and not summary["preempted"] and recipe.checkpoint.save_final:
        export = export_final(recipe)
        summary["export"] = str(export)
        if recipe.logging.sample_prompt is not None and recipe.model.task == "causal_lm":
            summary["sample"] = sample(export, recipe)
            print(f"--- sample (prompt {recipe.logging.sample_prompt!r}) ---\n{summary['sample']}\n---", flush=True)
    summary["total_s"] = time.perf_counter() - started
    if trainer.rank == 0:
        val = summary.get("val") or {}
        ppl = f", val ppl {val['val_ppl']:.2f}" if "val_ppl" in val else ""
        losses = ""
        if summary["first_loss"] is not None:
            losses = f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
        print(
            f"llm: done: {summary['steps']} steps{losses}{ppl}, {summary['total_s']:.1f} s"
            + (" (preempted)" if summary["preempted"] else ""),
            file=sys.stderr,
            flush=True,
        )
        if "export" in summary:
            latest = ckpt.find_checkpoint(Path(recipe.run_dir) / "checkpoints")
            print(f"llm: checkpoint {latest}, model exported to {summary['export']}", file=sys.stderr, flush=True)
    return summary


def export_final(recipe: RecipeConfig) -> Path:
    """The latest checkpoint as an llm model directory (config.yaml + model.safetensors [+ tokenizer.json])."""
    out = Path(recipe.run_dir) / "export"
    save_pretrained(ckpt.load_model_from_checkpoint(Path(recipe.run_dir) / "checkpoints"), out)
    if recipe.data.tokenizer and Path(recipe.data.tokenizer).is_file():
        shutil.copy(recipe.data.tokenizer, out / "tokenizer.json")
    return out


def sample(export: Path, recipe: RecipeConfig) -> str:
    """A sample (temperature 0.8, top-k 40) from the exported model, decoded with the run's tokenizer."""
    import torch

    from llm.data.tokenizer import Tokenizer
    from llm.models.generation import generate

    model = load_pretrained(export)
    tok = Tokenizer(export / "tokenizer.json")
    ids = tok.tokenizer.encode(recipe.logging.sample_prompt).ids or [tok.eos_id or 0]
    g = torch.Generator().manual_seed(recipe.seed)
    out = generate(
        model, torch.tensor([ids]), max_new_tokens=recipe.logging.sample_tokens, temperature=0.8, top_k=40, generator=g
    )
    return tok.tokenizer.decode(out[0].tolist())
