"""Distillation: the loss against a float64 reference written from the formula, the shared-tokenizer
check, and `llm distill` runs on the engine with checkpoints, resume and ZeRO-3."""

import copy
import math
import subprocess

import pytest
import torch

from llm.compress.distill import Distiller, distillation_loss
from llm.config import ConfigError
from llm.kernels.reference import IGNORE_INDEX
from llm.run.loader import load_model
from llm.run.recipe import resolve_recipe
from llm.run.train import load_teacher
from tests.conftest import build, rel_err
from tests.train.helpers import PYTHON, ROOT, TINY, TORCHRUN, env, losses, write_recipe


def reference(student, teacher, labels, hard, T, alpha):
    """alpha * T^2 * mean over counted positions of sum_c p_c (log p_c - log q_c) + (1 - alpha) * hard, float64."""
    s, t = student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    total, count = 0.0, 0
    for row, label in enumerate(labels.reshape(-1).tolist()):
        if label == IGNORE_INDEX:
            continue
        p = [math.exp(v / T) for v in t[row].tolist()]
        q = [math.exp(v / T) for v in s[row].tolist()]
        zp, zq = sum(p), sum(q)
        total += sum(pi / zp * (math.log(pi / zp) - math.log(qi / zq)) for pi, qi in zip(p, q))
        count += 1
    return alpha * T**2 * total / count + (1 - alpha) * hard


@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.1)])
def test_loss_matches_the_formula(T, alpha):
    student, teacher = torch.randn(3, 7, 37) * 3, torch.randn(3, 7, 37) * 3
    labels = torch.randint(0, 37, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    hard = torch.tensor(2.5)
    loss, kl = distillation_loss(student, teacher, labels, hard, T, alpha)
    assert rel_err(loss, torch.tensor(reference(student, teacher, labels, 2.5, T, alpha))) < 1e-6
    same, zero = distillation_loss(teacher, teacher, labels, hard, T, 1.0)
    assert abs(zero.item()) < 1e-6 and kl.item() > 0


def test_teacher_gets_no_gradient_and_student_does():
    spec = dict(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=50, max_seq_len=16)
    student, teacher = build(spec), build({**spec, "d_model": 48, "n_layers": 2})
    d = Distiller(student, teacher, "t", temperature=2.0, alpha=0.5, hidden_mse=1.0).train()
    ids = torch.randint(0, 50, (2, 9))
    d(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in d.parameters())
    assert not teacher.training and d.proj.weight.shape == (48, 32)
    assert "teacher" not in dict(d.named_modules())  # not trained, checkpointed or sharded by the engine


def test_hidden_state_term_of_a_classifier_counts_real_tokens_only():
    """Padded texts of 2 and 9 tokens: the MSE term is the float64 mean over the real tokens' features,
    each text run alone (padding would add its positions to the mean)."""
    spec = dict(n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=50, max_seq_len=16, causal=False)
    student = build(spec, task="text_classification", pooling="mean")
    teacher = build({**spec, "d_model": 48}, task="text_classification", pooling="mean")
    d = Distiller(student, teacher, "t", temperature=2.0, alpha=1.0, hidden_mse=1.0).train()
    for m in (student, teacher):
        m.eval()  # no dropout; Distiller.forward only needs its own training flag
    texts = [torch.randint(1, 50, (2,)), torch.randint(1, 50, (9,))]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        got = d(input_ids=ids, attention_mask=mask, labels=labels).loss
        s, t = student(input_ids=ids, attention_mask=mask), teacher(input_ids=ids, attention_mask=mask)
        kl = distillation_loss(s.logits, t.logits, labels, None, 2.0, 1.0)[0]
        alone = [(student(input_ids=x[None]).hidden_states, teacher(input_ids=x[None]).hidden_states) for x in texts]
        errs = [(d.proj(h_s).double() - h_t.double()) ** 2 for h_s, h_t in alone]
    mse = sum(e.sum() for e in errs) / sum(e.numel() for e in errs)
    assert rel_err(got - kl, mse) < 1e-5


def recipe_dict(tmp_path, teacher, **distill):
    r = copy.deepcopy(TINY)
    r["model"].update(n_layers=1, d_model=32, n_heads=2, d_ff=64)
    r["run_dir"] = str(tmp_path / "student")
    r["distill"] = {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5, **distill}
    return r


def test_teacher_must_share_the_tokenizer(tmp_path):
    from llm.run.loader import save_pretrained

    spec = {k: v for k, v in TINY["model"].items() if k != "base"}
    save_pretrained(build({**spec, "vocab_size": 300}), tmp_path / "teacher")
    with pytest.raises(ConfigError, match="distill.teacher.*share the tokenizer"):
        load_teacher(resolve_recipe(recipe_dict(tmp_path, tmp_path / "teacher")))
    save_pretrained(build(spec), tmp_path / "teacher2")
    (tmp_path / "tok.json").write_text("{}")
    r = recipe_dict(tmp_path, tmp_path / "teacher2")
    r["data"]["tokenizer"] = str(tmp_path / "tok.json")
    with pytest.raises(ConfigError, match="tokenizer"):
        load_teacher(resolve_recipe(r))


def distill_cmd(recipe, ranks=1, *sets):
    head = (
        [PYTHON, "-m", "llm"] if ranks == 1 else [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "llm"]
    )
    return [*head, "distill", str(recipe), *[x for s in sets for x in ("--set", s)]]


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    r = copy.deepcopy(TINY)
    r["run_dir"] = str(tmp / "run")
    recipe = write_recipe(tmp / "teacher.yaml", r)
    run([PYTHON, "-m", "llm", "pretrain", str(recipe)])
    return tmp / "run" / "export"


def test_distill_runs_checkpoints_resumes_and_exports_the_student(tmp_path, teacher):
    r = recipe_dict(tmp_path, teacher, hidden_mse=0.5)
    r["train"]["max_steps"] = 4
    r["checkpoint"] = {"every_steps": 2}
    recipe = write_recipe(tmp_path / "distill.yaml", r)
    run(distill_cmd(recipe))
    run(distill_cmd(recipe, 1, "train.max_steps=6"))
    steps = losses(tmp_path / "student")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in steps.values())
    exported = load_model(tmp_path / "student" / "export")
    from_checkpoint = load_model(tmp_path / "student")
    assert exported.config.d_model == 32 and "distill" not in exported.description()
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(exported(ids).logits, from_checkpoint(ids).logits)


def test_llm_distill_without_a_teacher_is_one_clear_error(tmp_path):
    r = copy.deepcopy(TINY)
    r["run_dir"] = str(tmp_path / "x")
    proc = subprocess.run(
        distill_cmd(write_recipe(tmp_path / "r.yaml", r)), cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("llm: error: distill.teacher")


@pytest.mark.distributed
def test_distill_under_zero3_on_two_ranks(tmp_path, teacher):
    r = recipe_dict(tmp_path, teacher)
    r["train"]["max_steps"] = 3
    r["deepspeed"] = {"preset": "zero3"}
    run(distill_cmd(write_recipe(tmp_path / "z3.yaml", r), 2))
    assert sorted(losses(tmp_path / "student")) == [1, 2, 3]
    assert load_model(tmp_path / "student" / "export").config.d_model == 32
