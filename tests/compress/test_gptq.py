"""GPTQ: the grid is torchao's to the bit; the lazy-batch Cholesky form equals the paper's Algorithm 1 written
plainly in float64 (explicit inverse Hessian, downdated column by column); its reconstruction error is below
RTN's; a singular Hessian is dampened more and said so; a GPTQ model saves and reloads bit-identically."""

import logging
import warnings

import pytest
import torch
from torch import nn

from llm.compress import gptq, quantize
from llm.config import ConfigError
from llm.errors import UserError
from llm.run.loader import load_model, save_pretrained
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")
LLAMA = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=100, max_seq_len=32)
LLAMA.update(mlp="swiglu", norm="rmsnorm", position="rotary", bias=False)


def plain_gptq(W: torch.Tensor, H: torch.Tensor, grid: quantize.Grid, damp: float = 0.01) -> torch.Tensor:
    """Frantar et al. 2022, Algorithm 1 without lazy batches or Cholesky: quantize column j, spread its error
    over the remaining columns with [H_F^-1]_{j,:} / [H_F^-1]_jj, remove j from F by downdating H_F^-1.
    Dead inputs and dampening as in the reference implementation. Returns the integers (N, K) float64."""
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    g = grid.group_size or W.shape[1]
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % g == 0:
            scale = grid.scale(W[:, j : j + g])
        q = grid.quantize(W[:, j : j + 1], scale)
        Q[:, j] = q[:, 0]
        err = (W[:, j] - grid.dequantize(q, scale)[:, 0]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


def layer_and_inputs(n=37, k=64, tokens=101):
    """A weight (n, k) and inputs X (k, tokens) float64 whose channels differ in scale; input 5 never fires."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(k, tokens, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(k, 1, generator=g))
    X[5] = 0
    return torch.randn(n, k, generator=g, dtype=torch.float64), X


def torchao_config(method: str, group_size: int):
    """The torchao config (the dev extra's reference) that `method` reproduces."""
    q = pytest.importorskip("torchao.quantization")
    if method == "int4":
        return q.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=q.PerGroup(group_size), scale_dtype=torch.float16
        )
    return q.Int8DynamicActivationInt8WeightConfig() if method == "int8-dynamic" else q.Int8WeightOnlyConfig()


@pytest.mark.parametrize("method", quantize.METHODS)
def test_grid_is_torchaos_to_the_bit(method):
    """Integers, scales, zero points and dequantized weights of Grid.rtn equal what torchao's config of the
    method stores, including an all-zero group and a group whose fp16 scale underflows."""
    config = torchao_config(method, 16)
    from torchao.quantization import quantize_

    layer = nn.Linear(64, 37)
    with torch.no_grad():
        layer.weight[0, :16] = 0
        layer.weight[1, :16] = 1e-9
        layer.weight[2] *= 1000
    w = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    quantize_(model, config)
    grid = quantize.Grid.of("int4" if method == "int4" else "int8", 16)
    for ours, theirs in zip(grid.rtn(w), (model[0].weight.qdata, model[0].weight.scale, model[0].weight.zero_point)):
        assert torch.equal(ours, theirs)
    assert torch.equal(grid.fake_quantize(w), model[0].weight.dequantize())


@pytest.mark.parametrize("method,block_size", [("int4", 32), ("int4", 128), ("int8", 24)])
def test_gptq_equals_the_plain_algorithm_and_beats_rtn(method, block_size):
    W, X = layer_and_inputs()
    H = 2 * X @ X.T / X.shape[1]
    grid = quantize.Grid.of(method, 16)
    qdata, scale, zero_point = gptq.gptq(W, H, grid, block_size=block_size)
    assert torch.equal(qdata.double(), plain_gptq(W, H, grid))
    assert qdata.dtype == zero_point.dtype == torch.int8 and not zero_point.any()
    assert scale.dtype == grid.scale_dtype and scale.shape == (37, 4 if method == "int4" else 1)
    assert (qdata >= grid.qmin).all() and (qdata <= grid.qmax).all()
    assert (qdata[:, 5] == 0).all()  # a dead input's weight is zeroed
    g = grid.group_size or 64
    Q = grid.dequantize(qdata.double(), scale.repeat_interleave(g, dim=1))
    rtn = grid.fake_quantize(W)
    assert (W @ X - Q @ X).norm() < 0.9 * (W @ X - rtn @ X).norm()


def test_a_singular_hessian_is_dampened_more_and_logged(caplog):
    """Zero dampening of a rank-3 Hessian fails its Cholesky factorisation: GPTQ retries with 1% of the mean
    diagonal (the paper's default), warns naming the layer, and gives the default's result."""
    W, X = layer_and_inputs(tokens=3)
    H = (2 * X @ X.T / 3).float()
    grid = quantize.Grid.of("int4", 16)
    with caplog.at_level(logging.WARNING, logger="llm"):
        retried = gptq.gptq(W.float(), H, grid, damp=0.0, name="blocks.0.attn.qkv")
    assert "blocks.0.attn.qkv: the Hessian of its inputs is singular with dampening 0" in caplog.text
    default = gptq.gptq(W.float(), H, grid, damp=0.01)
    assert all(torch.equal(a, b) for a, b in zip(retried, default))
    H[3, 4] = float("nan")
    with pytest.raises(UserError, match="blocks.0.mlp.fc_in: its calibration inputs are not finite"):
        gptq.gptq(W.float(), H, grid, name="blocks.0.mlp.fc_in")


def batches(n=3, vocab=100, length=16):
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, vocab, (4, length), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_gptq_model_is_todays_format_and_reloads_bit_identical(tmp_path, method):
    """The saved model holds the integers GPTQ chose (not RTN's) in today's layout, records the
    quantize transform with the algorithm that chose them, and reloads with bit-identical logits."""
    model = build(LLAMA).eval()
    original = model.transformer.blocks[1].mlp.fc_out.weight.detach().clone()
    gptq.quantize_model(model, batches(), method, 32)
    assert model.transforms == [{"name": "quantize", "method": method, "group_size": 32, "algorithm": "gptq"}]
    weight = model.transformer.blocks[1].mlp.fc_out.weight
    qdata = weight.parts()[0]
    qdata = quantize.unpack_int4(qdata) if method == "int4" else qdata
    assert not torch.equal(qdata, quantize.Grid.of(method, 32).rtn(original)[0])
    assert rel_err(weight.dequantize(), original) < 0.15
    ids = torch.randint(0, 100, (2, 11))
    before = model(ids).logits
    save_pretrained(model, tmp_path)
    assert torch.equal(load_model(tmp_path).eval()(ids).logits, before)


def test_bad_requests_are_named():
    with pytest.raises(ConfigError, match="group_size.*48 does not divide"):
        gptq.quantize_model(build(LLAMA), batches(), "int4", 48)
    with pytest.raises(UserError, match="expected int4 or int8"):
        gptq.quantize_model(build(LLAMA), batches(), "int8-dynamic", 32)
    with pytest.raises(UserError, match="calibration data: no batches"):
        gptq.quantize_model(build(LLAMA), [], "int4", 32)
    with pytest.raises(UserError, match=r"calibration data: 20 real tokens; at least 96 .*blocks.\d.mlp.fc_out"):
        gptq.quantize_model(build(LLAMA), [{"input_ids": torch.randint(0, 100, (2, 10))}], "int4", 32)
