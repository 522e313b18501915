"""The `parallel:` section without processes: the data x sequence x tensor mesh, each rank's slice of a
batch, and the one-line refusals of --dry-run (world size, heads, tasks and transforms sequence parallelism
cannot split)."""

import itertools

import pytest
import torch

from llm.cli import main
from llm.kernels.reference import IGNORE_INDEX
from llm.train.parallel import Mesh, ParallelConfig, slice_batch
from tests.train.helpers import TINY, write_recipe


def test_mesh_orders_ranks_tensor_fastest_then_sequence_then_data():
    mesh = Mesh.of(ParallelConfig(sequence=3, tensor=2), 12)
    assert (mesh.data, mesh.sequence, mesh.tensor, mesh.world_size) == (2, 3, 2, 12)
    expected = list(itertools.product(range(2), range(3), range(2)))  # row-major (dp, sp, tp)
    assert [mesh.coordinates(r) for r in range(12)] == expected
    assert [mesh.rank(*c) for c in expected] == list(range(12))


def test_slices_of_a_batch_put_together_give_the_padded_batch():
    """Seq 10 over 4 ranks: padded to 12, 3 positions each; every target kept, positions global, the
    padding without target, key or document of its own."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 10), generator=g)
    batch = {
        "input_ids": ids,
        "labels": torch.roll(ids, -1, 1),
        "document_ids": torch.tensor([[0] * 4 + [1] * 6] * 2),
        "attention_mask": torch.ones(2, 10, dtype=torch.long),
        "next_sentence_label": torch.tensor([0, 1]),
    }
    batch["attention_mask"][1, 8:] = 0
    slices = [slice_batch(batch, r, 4) for r in range(4)]
    assert all(s["input_ids"].shape == (2, 3) for s in slices)
    whole = {k: torch.cat([s[k] for s in slices], dim=1) for k in ("input_ids", "labels", "attention_mask",
                                                                  "document_ids", "position_ids")}  # fmt: skip
    for key in ("input_ids", "labels", "attention_mask", "document_ids"):
        assert torch.equal(whole[key][:, :10], batch[key]), key
    assert torch.equal(whole["position_ids"][:, :10], torch.arange(10).expand(2, 10))
    assert (whole["labels"][:, 10:] == IGNORE_INDEX).all() and (whole["attention_mask"][:, 10:] == 0).all()
    assert (whole["document_ids"][:, 10:] == 2).all()  # a document after the last
    assert all(torch.equal(s["next_sentence_label"], batch["next_sentence_label"]) for s in slices)
    # a batch that divides is only cut: no mask appears; positions (1, T) hold for every row
    half = slice_batch({"input_ids": ids, "position_ids": torch.arange(10)[None]}, 1, 2)
    assert "attention_mask" not in half and torch.equal(half["position_ids"], torch.arange(5, 10).expand(2, 5))


def refused(tmp_path, capsys, monkeypatch, world: int, **sections) -> str:
    """The one line `llm pretrain --dry-run` prints for TINY with `sections` (mappings merged into TINY's) on
    `world` ranks (exit status 2)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    recipe = {**TINY, "run_dir": str(tmp_path / "run")}
    for name, value in sections.items():
        recipe[name] = {**recipe.get(name, {}), **value} if isinstance(value, dict) else value
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["pretrain", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "world, sections, message",
    [
        (3, {"parallel": {"sequence": 2}}, "llm: error: parallel: 3 ranks do not divide into sequence 2 x tensor 1"),
        (8, {"parallel": {"sequence": 2, "tensor": 3}}, "llm: error: parallel: 8 ranks do not divide into sequence 2 x "
                                                        "tensor 3"),
        (4, {"parallel": {"sequence": 4}, "model": {"n_heads": 8, "n_kv_heads": 2, "d_model": 64}},
         "llm: error: model.n_kv_heads: 2 key/value heads do not divide over parallel.sequence=4 ranks"),
        (4, {"parallel": {"sequence": 4}, "model": {"n_heads": 2}},
         "llm: error: model.n_heads: 2 query heads do not divide over parallel.sequence=4 ranks"),
        (2, {"parallel": {"tensor": 2}}, "llm: error: parallel.tensor: 2: "),
        (2, {"parallel": {"sequence": 2}, "task": "masked_lm", "model": {"base": "bert-tiny", "causal": False}},
         "llm: error: parallel.sequence: 2: task 'masked_lm' does not split its sequences over ranks"),
        (2, {"parallel": {"sequence": 2}, "transforms": [{"name": "prompt", "num_virtual_tokens": 4}]},
         "llm: error: transforms[0]: prompt tuning puts virtual tokens before each sequence"),
    ],
)  # fmt: skip
def test_dry_run_refuses_what_sequence_parallelism_cannot_split(world, sections, message, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    assert refused(tmp_path, capsys, monkeypatch, world, **sections).startswith(message)


def test_dry_run_shows_the_batch_deepspeed_counts(tmp_path, capsys, monkeypatch):
    """4 ranks, sequence 2: 2 data-parallel ranks set the global batch; DeepSpeed counts a micro-batch per rank."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = write_recipe(tmp_path / "r.yaml", {**TINY, "run_dir": str(tmp_path / "run"), "parallel": {"sequence": 2},
                                              "train": {**TINY["train"], "global_batch_size": 8}})  # fmt: skip
    assert main(["pretrain", str(path), "--dry-run"]) == 0
    assert '"train_batch_size": 16' in capsys.readouterr().out
