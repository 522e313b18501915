"""Every shipped recipe trains (shrunk through --set-style overrides) and its loss falls."""

from pathlib import Path

import pytest

from llm.run.recipe import load_recipe
from llm.train.metrics import read_metrics
from tests.train.helpers import ROOT

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=null", "model.d_ff=128"]
FAST = [
    "train.micro_batch_size=8",
    "train.grad_accum=1",
    "train.max_steps=30",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "optim.lr=3.0e-3",
    "schedule.warmup_steps=3",
    "deepspeed.preset=zero1",
    "checkpoint.save_final=false",
    "logging.tensorboard=false",
    "logging.sample_prompt=null",
    "parallel.sequence=1",  # one rank here (tests/train/test_sequence_parallel.py splits sequences)
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Small BPE and WordPiece shard sets of the stdlib corpus (the recipes' own preparation, shrunk)."""
    from llm import data as D

    root = tmp_path_factory.mktemp("shards")
    files = [str(p) for p in D.stdlib_files(600_000)]
    out = {}
    for kind in ("bpe", "wordpiece"):
        tok = D.train_tokenizer(files, root / kind, kind=kind, vocab_size=1024)
        D.prepare(files, tok, root / kind, shard_tokens=100_000, val_fraction=0.3)
        out[kind] = (root / kind, tok)
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loss_falls(path: Path, shards, tmp_path):
    from llm.tasks import get_task
    from tests.train.helpers import assembled_trainer

    recipe = load_recipe(path)
    sets = [*TINY, *FAST, f"run_dir={tmp_path / 'run'}"]
    if recipe.model.is_image:
        sets += ["model.image_size=16", "train.max_steps=80", "optim.lr=1.0e-3"]  # pixels are learnt more slowly
    else:
        d, tok = shards["wordpiece" if get_task(recipe.task).name == "masked_lm" else "bpe"]
        sets += [
            f"data.train={d / 'train'}",
            f"data.val={d / 'val'}",
            f"data.tokenizer={tok}",
            "data.prepare=null",
            "data.seq_len=32",
            "model.vocab_size=1024",
        ]
    recipe = load_recipe(path, sets)
    trainer = assembled_trainer(recipe)
    summary = trainer.fit()
    summary["val"] = trainer.callbacks[0].last
    losses = [m["loss"] for m in read_metrics(recipe.run_dir) if "loss" in m]
    assert len(losses) == recipe.train.max_steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (path.stem, losses)
    if recipe.data.val is not None or recipe.data.source == "synthetic":
        assert summary["val"] is not None and summary["val"]["val_loss"] > 0
