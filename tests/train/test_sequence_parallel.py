"""Ulysses sequence parallelism on 2 and 4 CPU ranks (gloo) gives the loss and the gradient of one rank on the
same global batch, under ZeRO 0, 2 and 3, with sequence lengths the group does not divide, packed documents, GQA,
learned and rotary positions, and a sequence group smaller than the world; a run of sequence-parallel 2 resumes
on one rank with the losses it would have had.

The reference is the same trainer on one rank, ZeRO-0, given the whole global batch as one micro-batch. One
torchrun launch per world size runs every case of that size (each launch costs seconds to start)."""

import subprocess

import pytest
import torch

from llm.data import PackedDocuments
from llm.run.recipe import resolve_recipe
from tests.conftest import rel_err
from tests.train.helpers import ROOT, TINY, TORCHRUN, env, losses, run, write_recipe
from tests.train.loss_norm_worker import one_step

pytestmark = pytest.mark.distributed

EOS = 0
GPT = {**TINY["model"], "dropout": 0.0, "attention_dropout": 0.0}
LLAMA = {**GPT, "base": "llama-tiny", "n_heads": 4, "n_kv_heads": 2}  # rotary, GQA
# (ranks, sequence, ZeRO stage, model, sequence length, packed documents)
CASES = {
    2: [(2, 0, GPT, 16, False), (2, 2, LLAMA, 15, True), (2, 3, LLAMA, 16, False)],
    4: [
        (4, 0, {**LLAMA, "n_kv_heads": 4}, 15, False),
        (4, 3, {**GPT, "n_heads": 4}, 13, True),
        (2, 2, LLAMA, 16, True),
    ],  # a sequence group of 2 in a world of 4
}


def samples(seq_len: int, packed: bool, n: int = 2) -> dict:
    """`n` rows of next-token batches; packed rows hold several EOS-terminated documents (PackedDocuments)."""
    g = torch.Generator().manual_seed(seq_len)
    windows = torch.randint(1, 256, (n, seq_len + 1), generator=g)
    if not packed:
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}
    windows[0, [2, 3, 9]] = EOS
    windows[1, [seq_len // 2, seq_len - 1]] = EOS
    return PackedDocuments(EOS)(windows)


def recipe(run_dir, model: dict, micro: int, stage: int = 0, sequence: int = 1) -> dict:
    return {**TINY, "model": model, "run_dir": str(run_dir), "train": {**TINY["train"], "micro_batch_size": micro},
            "deepspeed": {"preset": f"zero{stage}"}, "parallel": {"sequence": sequence}}  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_step_equals_one_rank(ranks, tmp_path):
    cases, wants = [], []
    for i, (sequence, stage, model, seq_len, packed) in enumerate(CASES[ranks]):
        batch = samples(seq_len, packed)
        data = ranks // sequence
        per_rank = [{k: v[r::data] for k, v in batch.items()} for r in range(data)]  # rank r's micro-batch
        cases.append({"recipe": recipe(tmp_path / f"sp{i}", model, 2 // data, stage, sequence), "batches": per_rank})
        wants.append(one_step(resolve_recipe(recipe(tmp_path / f"ref{i}", model, 2)), [batch]))
    torch.save(cases, tmp_path / "cases.pt")
    command = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "tests.train.sequence_parallel_worker"]
    command += [str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case, got, want in zip(CASES[ranks], torch.load(tmp_path / "out.pt", weights_only=True), wants):
        assert got["grads"].keys() == want["grads"].keys(), case
        worst = max(rel_err(got["grads"][name], g) for name, g in want["grads"].items())
        assert worst < 1e-5, (case, worst)
        loss, ref = got["metrics"]["loss"], want["metrics"]["loss"]
        assert abs(loss - ref) < 1e-5 * abs(ref), (case, loss, ref)
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want["grads"].values()])).item()
        assert got["metrics"]["grad_norm"] == pytest.approx(norm, rel=1e-5), case


def test_sequence_parallel_2_resumes_on_one_rank(tmp_path):
    """ZeRO-2 on 2 ranks of one sequence group, checkpoints at steps 2 and 4; from step 2 one rank continues
    (through DeepSpeed's universal checkpoint, the data position global) with the losses of steps 3 and 4."""
    path = write_recipe(tmp_path / "r.yaml", {**TINY, "model": LLAMA, "data": {"source": "synthetic", "seq_len": 15}})
    sets = ["deepspeed.zero_stage=2", "checkpoint.every_steps=2", "train.max_steps=4", "checkpoint.save_final=false"]
    run(path, 2, f"run_dir={tmp_path / 'sp2'}", "parallel.sequence=2", *sets)
    step_2 = tmp_path / "sp2" / "checkpoints" / "step_00000002"
    run(path, 1, f"run_dir={tmp_path / 'one'}", *sets, resume=str(step_2))
    sp2, one = losses(tmp_path / "sp2"), losses(tmp_path / "one")
    assert sorted(one) == [3, 4]
    for step in (3, 4):
        assert abs(one[step] - sp2[step]) < 1e-4 * abs(sp2[step]), (step, one[step], sp2[step])
