"""SparseGPT equals its algorithm written plainly in float64 (explicit inverse Hessian downdated column by
column); masks have the requested sparsity; n:m masks for magnitude, Wanda and SparseGPT have exactly n zeros
in every m consecutive weights of a row; SparseGPT's reconstruction error is below magnitude pruning's."""

import pytest
import torch

from llm.compress import prune, sparsegpt
from llm.errors import UserError
from tests.compress.test_gptq import layer_and_inputs
from tests.compress.test_prune import SPECS
from tests.conftest import build, rel_err


def plain_sparsegpt(W, H, sparsity=0.5, pattern=None, damp=0.01, block=128):
    """Frantar & Alistarh 2023, Algorithm 1 without lazy batches: the mask of a block of 128 columns (or of m
    columns for n:m) is chosen when the sweep reaches it, by w^2 / [H^-1]_cc^2 with [H^-1]_cc the diagonal of
    the upper Cholesky factor of H^-1, as the paper defines it; column j's error w_j / [H_F^-1]_jj (pruned
    weights only) is spread over the remaining columns by [H_F^-1]_{j,:}, and j leaves F by a downdate."""
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    d = torch.linalg.cholesky(Hinv, upper=True).diagonal()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(W.shape[1]):
        if pattern and j % pattern[1] == 0:
            score = W[:, j : j + pattern[1]] ** 2 / d[j : j + pattern[1]] ** 2
            rows = torch.arange(len(W))[:, None]
            pruned[rows, j + score.argsort(dim=1)[:, : pattern[0]]] = True
        elif not pattern and j % block == 0:
            score = (W[:, j : j + block] ** 2 / d[j : j + block] ** 2).flatten()
            drop = score.argsort()[: int(sparsity * score.numel())]
            width = min(block, W.shape[1] - j)
            pruned[drop // width, j + drop % width] = True
        err = W[:, j] * pruned[:, j] / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        W[:, j] = W[:, j].masked_fill(pruned[:, j], 0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return W, pruned


def zeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w == 0).reshape(w.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (None, (2, 4))])
def test_sparsegpt_equals_the_plain_algorithm(sparsity, pattern):
    W, X = layer_and_inputs(k=192)  # two blocks of columns: 128 + 64
    H = 2 * X @ X.T / X.shape[1]
    out = sparsegpt.sparsegpt(W, H, sparsity, pattern)
    ref, pruned = plain_sparsegpt(W, H, sparsity, pattern)
    assert torch.equal(out == 0, pruned)
    assert rel_err(out, ref) < 1e-10
    if pattern:
        assert (zeros_per_group(out, 4) == 2).all()
    else:
        assert (out[:, :128] == 0).sum() == int(sparsity * 37 * 128)
        assert (out[:, 128:] == 0).sum() == int(sparsity * 37 * 64)
    if pattern:
        magnitude = W * prune.nm_mask(W.abs(), *pattern)
    else:  # as many zeros as SparseGPT's, the smallest |w|
        magnitude = W * (W.abs() > W.abs().flatten().kthvalue(int((out == 0).sum())).values)
    assert (W @ X - out @ X).norm() < 0.8 * (W @ X - magnitude @ X).norm()


def batches(n=3, length=16):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 100, (4, length), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_of_every_four_for_every_method(method):
    model = build(SPECS["gqa-swiglu-rope"]).eval()
    if method == "sparsegpt":
        sparsities = sparsegpt.prune_model(model, batches(), pattern="2:4")
    else:
        norms = prune.input_norms(model, batches(), 3) if method == "wanda" else None
        sparsities = prune.prune_unstructured(model, 0.0, method, norms=norms, pattern="2:4")
    layers = prune.prunable_linears(model)
    assert set(sparsities) == {name for name, _ in layers} and all(s == 0.5 for s in sparsities.values())
    for name, m in layers:
        assert (zeros_per_group(m.weight, 4) == 2).all(), name


def test_wanda_two_of_four_drops_the_lowest_scores():
    model = build(SPECS["mha-gelu"]).eval()
    norms = prune.input_norms(model, batches(), 3)
    original = {n: m.weight.detach().clone() for n, m in prune.prunable_linears(model)}
    prune.prune_unstructured(model, 0.0, "wanda", norms=norms, pattern="2:4")
    for name, m in prune.prunable_linears(model):
        score = (original[name].abs().double() * norms[name][None, :]).reshape(len(m.weight), -1, 4)
        kept = score >= score.sort(dim=-1).values[..., 2:3]  # the two largest of each group of four
        assert torch.equal(m.weight.reshape(kept.shape) != 0, kept), name


def test_sparsegpt_model_has_the_requested_sparsity():
    model = build(SPECS["mha-gelu"]).eval()
    sparsities = sparsegpt.prune_model(model, batches(), 0.6)
    assert all(abs(s - 0.6) < 0.01 for s in sparsities.values())
    assert abs(prune.sparsity_of(model) - 0.6) < 0.01


def test_bad_requests_are_named():
    model = build({**SPECS["mha-gelu"], "d_ff": 98})
    with pytest.raises(UserError, match=r"--pattern 2:4: transformer.blocks.0.mlp.fc_out's width 98 .* by 4"):
        sparsegpt.prune_model(model, batches(), pattern="2:4")
    with pytest.raises(UserError, match=r"--pattern 2:4: transformer.blocks.0.mlp.fc_out's width 98"):
        prune.prune_unstructured(model, 0.0, pattern="2:4")
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(UserError, match="--pattern: expected n:m"):
            prune.parse_pattern(bad)
    for sparsity in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match=r"--sparsity: expected 0 < s < 1"):
            sparsegpt.prune_model(model, batches(), sparsity)
