"""Tensor parallelism on 2 and 4 CPU ranks (gloo) gives the loss and the gradient of one rank on the same global
batch, under ZeRO 0 and 2, for GPT (MHA, GELU, biases, learned positions) and LLaMA (GQA, SwiGLU, rotary, Qwen3's
qk-norm, tied and untied), alone and with data or sequence parallelism, with GPT's dropout on one data rank (the
reference's masks); the validation loss counts a tensor group's batch once; each rank holds the parameters
`llm model info` counts for it; the whole model gathered for the export, and the checkpoint as `llm convert` reads
it, are the one-rank model after the same step; a trainer resumed from the checkpoint takes the next step bit for
bit, and a resume on another tensor size or number of ranks is refused.

The reference is the same trainer on one rank, ZeRO-0, given the whole global batch as one micro-batch. One
torchrun launch per world size runs every case of that size (each launch costs seconds to start)."""

import subprocess

import pytest
import torch

from llm.cli import main
from llm.models.info import parameters_per_rank
from llm.run.loader import build_from_description, load_model, load_weights
from llm.run.recipe import resolve_recipe
from llm.train.parallel import Mesh
from tests.conftest import rel_err
from tests.train.helpers import ROOT, TINY, TORCHRUN, env, write_recipe
from tests.train.loss_norm_worker import stepped_trainer

pytestmark = pytest.mark.distributed

TENSOR = 2
GPT = {**TINY["model"], "dropout": 0.0, "attention_dropout": 0.0}
LLAMA = {**GPT, "base": "llama-tiny", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True}
# (sequence, ZeRO stage, model, sequence length); the ranks beyond sequence x tensor are data parallel
CASES = {
    2: [(1, 0, {**GPT, "dropout": 0.1}, 16), (1, 2, LLAMA, 16)],  # one data rank: the reference's dropout masks
    4: [(1, 2, {**LLAMA, "tie_embeddings": False}, 16), (2, 0, {**GPT, "n_heads": 4}, 15)],
}


def samples(seq_len: int, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seq_len)
    windows = torch.randint(1, 256, (n, seq_len + 1), generator=g)
    return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


def recipe(run_dir, model: dict, micro: int, stage: int = 0, sequence: int = 1, tensor: int = 1) -> dict:
    return {**TINY, "model": model, "run_dir": str(run_dir), "train": {**TINY["train"], "micro_batch_size": micro},
            "deepspeed": {"preset": f"zero{stage}"}, "parallel": {"sequence": sequence, "tensor": tensor}}  # fmt: skip


def part(name: str, whole: torch.Tensor, cfg, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of a whole parameter (or gradient) in Megatron-LM's layout: qkv and fc_in keep their
    rows of each fused piece (the rank's q, k and v heads; its gate and up columns), proj and fc_out their
    columns; everything else is whole."""
    if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")):
        return whole.chunk(TENSOR, dim=1)[rank]
    if ".attn.qkv." in name:
        pieces = [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    elif ".mlp.fc_in." in name:
        pieces = [cfg.d_ff, cfg.d_ff] if cfg.mlp == "swiglu" else [cfg.d_ff]
    else:
        return whole
    rows, start = [], 0
    for n in pieces:
        rows += range(start + rank * n // TENSOR, start + (rank + 1) * n // TENSOR)
        start += n
    return whole[torch.tensor(rows)]


def refused(tmp_path, capsys, monkeypatch, world: int, case_recipe: dict, resume, **parallel) -> str:
    """The one line `llm pretrain --dry-run --resume CHECKPOINT` prints on `world` ranks (exit status 2)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    path = write_recipe(tmp_path / "resume.yaml", {**case_recipe, "parallel": parallel})
    capsys.readouterr()  # what came before
    assert main(["pretrain", str(path), "--dry-run", "--resume", str(resume)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_step_equals_one_rank(ranks, tmp_path, capsys, monkeypatch):
    cases, wants = [], []
    for i, (sequence, stage, model, seq_len) in enumerate(CASES[ranks]):
        batch = samples(seq_len)
        data = ranks // (sequence * TENSOR)
        per_rank = [{k: v[r::data] for k, v in batch.items()} for r in range(data)]  # rank r's micro-batch
        run = recipe(tmp_path / f"tp{i}", model, 2 // data, stage, sequence, TENSOR)
        cases.append({"recipe": run, "batches": per_rank})
        trainer, result = stepped_trainer(resolve_recipe(recipe(tmp_path / f"ref{i}", model, 2)), [batch])
        wants.append((trainer.model, result, trainer.evaluate(trainer.train_batches, 1)))
    torch.save(cases, tmp_path / "cases.pt")
    command = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "tests.train.tensor_parallel_worker"]
    command += [str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = torch.load(tmp_path / "out.pt", weights_only=True)
    for i, (case, got, (model, want, evaluated)) in enumerate(zip(CASES[ranks], outs, wants)):
        mesh = Mesh(ranks // (case[0] * TENSOR), case[0], TENSOR)
        for rank, mine in enumerate(got["ranks"]):
            tp = mesh.coordinates(rank)[2]
            assert mine["grads"].keys() == want["grads"].keys(), (case, rank)
            worst = max(rel_err(mine["grads"][n], part(n, g, model.config, tp)) for n, g in want["grads"].items())
            assert worst < 1e-5, (case, rank, worst)
            assert mine["parameters"] == parameters_per_rank(model, TENSOR), (case, rank)  # llm model info's count
        loss, ref = got["metrics"]["loss"], want["metrics"]["loss"]
        assert abs(loss - ref) < 1e-5 * abs(ref), (case, loss, ref)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want["grads"].values()])).item()
        assert got["metrics"]["grad_norm"] == pytest.approx(norm, rel=1e-5), case
        assert got["eval"]["val_loss"] == pytest.approx(evaluated["val_loss"], rel=1e-5), case  # a batch once
        assert all(got["resumes"]), (case, got["resumes"])
        # the whole model after the step, gathered as the export is and consolidated from the checkpoint, computes
        # the one-rank model's logits (weight by weight the key bias differs: its gradient is 0 but for rounding,
        # which Adam's first step turns into +-lr, and the logits do not depend on it)
        whole = build_from_description(model.description(), "gathered")
        load_weights(whole, got["whole"], "gathered")
        main(["convert", str(tmp_path / f"tp{i}" / "checkpoints"), str(tmp_path / f"converted{i}"), "--to", "llm"])
        ids = samples(seq_len=11)["input_ids"]
        expected = model.eval()(ids).logits
        for name, loaded in (("gathered", whole), ("converted", load_model(tmp_path / f"converted{i}"))):
            assert rel_err(loaded.eval()(ids).logits, expected) < 1e-5, (case, name)
    # a checkpoint of tensor 2 on 2 ranks resumes only so
    run, step = cases[0]["recipe"], tmp_path / "tp0" / "checkpoints" / "step_00000001"
    data = {"sequence": CASES[ranks][0][0]}
    line = refused(tmp_path, capsys, monkeypatch, ranks, run, step, **data, tensor=1)
    assert line.startswith(f"llm: error: parallel.tensor: is 1 but the checkpoint {step} was trained with 2"), line
    line = refused(tmp_path, capsys, monkeypatch, 2 * ranks, run, step, **data, tensor=TENSOR)
    assert line.startswith(f"llm: error: parallel.tensor: 2: the tensor-parallel checkpoint {step} resumes on the "
                           f"{ranks} ranks it was saved by, not {2 * ranks}"), line  # fmt: skip
