"""Every method through the real trainer: parameters outside the trainable set stay bit-identical,
the trainable ones change (ZeRO-0 in this process, ZeRO-3 on 2 ranks); LoRA merges under ZeRO-3;
the start-up line counts trainable and total parameters correctly under ZeRO-3."""

import json
import re
import subprocess

import pytest

from tests.adapt.methods import METHODS, compare, recipe, snapshot
from tests.train.helpers import ROOT, TORCHRUN, assembled_trainer, env

# What each method trains on the TINY GPT (2 blocks, tied embeddings).
EXPECTED = {
    "lora": lambda n: "lora_" in n,
    "prefix": lambda n: n.startswith("transformer.prefix."),
    "prompt": lambda n: n.startswith("transformer.prompt."),
    "freeze": lambda n: n.startswith(("transformer.blocks.1.", "transformer.norm.")),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_zero0_trains_only_the_trainable_set(method, tmp_path):
    trainer = assembled_trainer(recipe(method, tmp_path / "run"))
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if EXPECTED[method](n)}
    before = snapshot(model)
    for _ in range(3):
        trainer.train_step()
    assert compare(before, snapshot(model), trainable) == {"frozen_changed": [], "trainable_unchanged": []}


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapted_run_reloads_from_its_checkpoint(method, tmp_path):
    """The checkpoint records the transforms; the loader rebuilds them before loading the weights."""
    import torch

    from llm.run.loader import load_model

    trainer = assembled_trainer(recipe(method, tmp_path / "run", save=True))
    trainer.fit()
    reloaded = load_model(tmp_path / "run")
    assert reloaded.transforms == trainer.model.transforms == METHODS[method]
    x = torch.randint(0, 256, (2, 10))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, trainer.model(x).logits)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero3")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "tests.adapt.zero3_worker"]
    proc = subprocess.run(
        [*cmd, str(d / "out.json"), str(d / "runs")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((d / "out.json").read_text()), proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("method", list(METHODS))
def test_zero3_trains_only_the_trainable_set(method, zero3):
    found = zero3[0][method]
    assert found["frozen_changed"] == [] and found["trainable_unchanged"] == []
    assert found["trainable"] and all(EXPECTED[method](n) for n in found["trainable"])


@pytest.mark.distributed
def test_zero3_lora_merges_to_the_adapted_logits(zero3):
    merge = zero3[0]["merge"]
    assert merge["copy_rel_err"] < 1e-5 and merge["in_place_rel_err"] < 1e-5
    assert merge["lora_left"] == [] and merge["transforms"] == []


@pytest.mark.distributed
def test_zero3_start_up_counts_trainable_and_total_parameters(zero3, tmp_path):
    """The counts read from the log equal those of the same model built whole in this process."""
    from llm.run.train import build_model
    from llm.tasks import get_task

    counts = re.findall(r"parameters: ([\d,]+) trainable of ([\d,]+)", zero3[1])
    assert len(counts) == len(METHODS)  # one line per run, from rank 0 only
    for method, (trainable, total) in zip(METHODS, counts):
        r = recipe(method, tmp_path)
        model = build_model(r, get_task(r.task))
        params = {id(p): p for p in model.parameters()}.values()
        assert int(trainable.replace(",", "")) == sum(p.numel() for p in params if p.requires_grad) > 0
        assert int(total.replace(",", "")) == sum(p.numel() for p in params)


BAD = {
    "unknown_lora_target": (
        {"name": "lora", "targets": ["q", "query_proj"]},
        "transforms[0].targets[1]: 'query_proj' matches no linear layer",
    ),
    "prefix_beyond_positions": (
        {"name": "prefix", "num_virtual_tokens": 64},
        "transforms[0].num_virtual_tokens: 64 virtual tokens leave no room in the model's 64 positions",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_adapter_settings_are_one_clear_line(name, tmp_path, capsys):
    from llm.cli import main
    from tests.train.helpers import TINY, write_recipe

    spec, message = BAD[name]
    recipe = write_recipe(tmp_path / "recipe.yaml", {**TINY, "transforms": [spec], "run_dir": str(tmp_path / "run")})
    assert main(["pretrain", str(recipe), "--resume", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm: error: ") and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()
