"""The `parallel:` section without processes: the data x sequence x tensor mesh, each rank's slice of a
batch, the split of a tensor-parallel layer, and the one-line refusals of --dry-run (world size, heads, MLP width,
families, tasks, transforms and ZeRO stages sequence or tensor parallelism cannot split)."""

import itertools

import pytest
import torch

from llm.cli import main
from llm.errors import UserError
from llm.kernels.reference import IGNORE_INDEX
from llm.models.layers import TensorSplit
from llm.train.parallel import Mesh, ParallelConfig, slice_batch
from llm.train.tensor_parallel import merge_shards
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


def test_a_tensor_parallel_split_keeps_each_ranks_heads_whole():
    """qkv of 4 query and 2 key/value heads (head_dim 1) over 2 ranks: rank 0 computes q0, q1 and k0, v0 (the
    head they read), rank 1 q2, q3, k1, v1; a row-parallel weight splits its inputs; merge puts them back."""
    qkv = TensorSplit(0, (4, 2, 2))
    rows = torch.arange(8.0)[:, None].expand(8, 3)
    assert [qkv.shard(rows, r, 2)[:, 0].tolist() for r in range(2)] == [[0, 1, 4, 6], [2, 3, 5, 7]]
    assert torch.equal(qkv.merge([qkv.shard(rows, r, 2) for r in range(2)]), rows)
    proj = TensorSplit(1)
    cols = torch.randn(3, 8)
    assert torch.equal(proj.shard(cols, 1, 4), cols[:, 2:4])
    assert torch.equal(proj.merge([proj.shard(cols, r, 4) for r in range(4)]), cols)
    with pytest.raises(ValueError, match="do not divide into 4 parts"):
        qkv.shard(rows, 0, 4)


def test_tensor_ranks_parts_that_do_not_fit_together_are_one_error():
    """A checkpoint's tensor ranks' states merge into the whole model's, or raise UserError naming the file."""
    splits = {"qkv": TensorSplit(0, (4, 2, 2))}
    part = {"qkv": torch.zeros(4, 3), "norm": torch.ones(3)}
    assert merge_shards([part, part], splits, "ckpt")["qkv"].shape == (8, 3)
    with pytest.raises(UserError, match=r"ckpt: norm is \(4,\) on tensor rank 1"):
        merge_shards([part, {**part, "norm": torch.ones(4)}], splits, "ckpt")
    for other in ({"norm": torch.ones(3)}, {**part, "qkv": torch.zeros(5, 3)}):  # a part missing, or cut otherwise
        with pytest.raises(UserError, match="ckpt: the tensor ranks' weights do not merge"):
            merge_shards([part, other], splits, "ckpt")


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
        (4, {"parallel": {"tensor": 4}}, "llm: error: model.n_heads: 2 query heads do not divide over "
                                         "parallel.tensor=4 ranks (tensor parallelism splits the heads)"),
        (4, {"parallel": {"sequence": 2, "tensor": 2}, "model": {"n_heads": 2}},
         "llm: error: model.n_heads: 2 query heads do not divide over parallel.sequence=2 x parallel.tensor=2 ranks"),
        (2, {"parallel": {"tensor": 2}, "model": {"base": "llama-tiny", "n_heads": 4, "n_kv_heads": 1}},
         "llm: error: model.n_kv_heads: 1 key/value heads do not divide over parallel.tensor=2 ranks"),
        (2, {"parallel": {"tensor": 2}, "model": {"d_ff": 129}},
         "llm: error: model.d_ff: 129 does not divide over parallel.tensor=2 ranks"),
        (2, {"parallel": {"tensor": 2}, "model": {"base": "bert-tiny", "causal": True}},
         "llm: error: model.family: tensor parallelism splits gpt and llama models, not bert"),
        (2, {"parallel": {"tensor": 2}, "task": {"name": "text_classification", "num_labels": 2}},
         "llm: error: parallel.tensor: 2: task 'text_classification' is not trained tensor-parallel"),
        (2, {"parallel": {"tensor": 2}, "deepspeed": {"zero_stage": 3}},
         "llm: error: deepspeed.zero_stage: 3 with parallel.tensor=2: ZeRO-3 would cut the tensor-parallel shards"),
        (2, {"parallel": {"tensor": 2}, "transforms": [{"name": "prompt", "num_virtual_tokens": 4}]},
         "llm: error: transforms[0]: prompt: tensor parallelism splits the model's own linear layers only"),
        (2, {"parallel": {"tensor": 2}, "model": {"attention_dropout": 0.1}},
         "llm: error: model.attention_dropout: 0.1: every rank of a tensor group would drop"),
        (2, {"parallel": {"sequence": 2}, "task": "masked_lm", "model": {"base": "bert-tiny", "causal": False}},
         "llm: error: parallel.sequence: 2: task 'masked_lm' does not split its sequences over ranks"),
        (2, {"parallel": {"sequence": 2}, "transforms": [{"name": "prompt", "num_virtual_tokens": 4}]},
         "llm: error: transforms[0]: prompt tuning puts virtual tokens before each sequence"),
    ],
)  # fmt: skip
def test_dry_run_refuses_what_sequence_and_tensor_parallelism_cannot_split(world, sections, message, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    assert refused(tmp_path, capsys, monkeypatch, world, **sections).startswith(message)


@pytest.mark.parametrize("parallel, counted", [({"sequence": 2}, 16), ({"tensor": 2}, 8)])
def test_dry_run_shows_the_batch_deepspeed_counts(parallel, counted, tmp_path, capsys, monkeypatch):
    """4 ranks, sequence or tensor 2: 2 data-parallel ranks set the global batch; DeepSpeed counts a micro-batch
    per rank of a sequence group, one per tensor group (its data-parallel rank)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = write_recipe(tmp_path / "r.yaml", {**TINY, "run_dir": str(tmp_path / "run"), "parallel": parallel,
                                              "train": {**TINY["train"], "global_batch_size": 8}})  # fmt: skip
    assert main(["pretrain", str(path), "--dry-run"]) == 0
    assert f'"train_batch_size": {counted}' in capsys.readouterr().out
