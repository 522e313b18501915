"""AWQ: folding scales into the preceding op keeps the float function of every architecture (pre- and
post-norm, MHA and GQA, GELU and SwiGLU, biases, padded batches); on a model whose activations have a few
salient channels, AWQ's quantized model is closer to the float one than RTN's; its clipping minimises the
rounded groups' output error; the quantized model is today's format and reloads bit-identically."""

import warnings

import pytest
import torch
from torch import nn

from llm.compress import awq, calibrate, quantize
from llm.compress.quantized import QuantizedWeight
from llm.run.loader import load_model, save_pretrained
from tests.compress.test_classifier import BERT, padded_batch
from tests.conftest import build, rel_err

warnings.filterwarnings("ignore")
COMMON = dict(n_layers=2, d_model=64, n_heads=4, d_ff=96, vocab_size=100, max_seq_len=32)
ARCHITECTURES = {  # name -> (spec, the scaled Linears of a block)
    "llama-gqa": (
        dict(COMMON, n_kv_heads=2, mlp="swiglu", norm="rmsnorm", position="rotary", bias=False),
        ["attn.qkv", "mlp.fc_in", "mlp.fc_out"],
    ),
    "mha-swiglu-bias": (
        dict(COMMON, mlp="swiglu", norm="rmsnorm", position="rotary", qkv_bias=True, bias=True),
        ["attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out"],
    ),
    "gpt": (dict(COMMON), ["attn.qkv", "attn.proj", "mlp.fc_in"]),
    "bert-classifier": (dict(BERT, task="text_classification", num_labels=3), ["attn.proj"]),
}


def inputs(spec: dict, n: int = 3) -> list[dict]:
    if spec.get("family") == "bert":
        return [padded_batch(4, 13, spec["vocab_size"]) for _ in range(n)]
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(0, spec["vocab_size"], (4, 16), generator=g)} for _ in range(n)]


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).logits


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_folded_scales_keep_the_function(name):
    spec, scaled = ARCHITECTURES[name]
    model = build(spec).eval()
    batch = inputs(spec, 1)[0]
    before = output(model, batch)
    g = torch.Generator().manual_seed(5)
    for block in model.transformer.blocks:
        pairs = awq.scaled_pairs(block)
        assert [p.linear for p in pairs] == scaled
        for pair in pairs:
            width = block.get_submodule(pair.linear).in_features
            awq.fold(block, pair, 0.25 + 4 * torch.rand(width, generator=g))
    assert rel_err(output(model, batch), before) < 1e-5


def with_salient_channels(model: nn.Module, factor: float = 16.0, n: int = 4) -> nn.Module:
    """A few input channels of each block's qkv and fc_in get `factor` times larger activations and smaller
    weights, keeping the function: the outlier features of LLMs' activations (Dettmers et al. 2022)."""
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for block in model.transformer.blocks:
            for norm, linear in ((block.attn_norm, block.attn.qkv), (block.mlp_norm, block.mlp.fc_in)):
                channels = torch.randperm(linear.in_features, generator=g)[:n]
                norm.weight[channels] *= factor
                linear.weight[:, channels] /= factor
    return model


@torch.no_grad()
def rounded(model: nn.Module, grid: quantize.Grid) -> nn.Module:
    """The model with every Linear of its blocks rounded to the grid (float weights)."""
    for block in model.transformer.blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(grid.fake_quantize(m.weight))
    return model


@pytest.mark.parametrize("name", ["llama-gqa", "mha-swiglu-bias"])
def test_awq_beats_rtn_on_salient_channels(name):
    """Calibrated on some batches, the scaled model keeps its function, and rounded it is closer to the float
    model than the rounded original on other batches."""
    spec = ARCHITECTURES[name][0]
    model = with_salient_channels(build(spec).eval())
    held_out = {"input_ids": torch.randint(0, 100, (8, 16))}
    reference = output(model, held_out)
    grid = quantize.Grid.of("int4", 32)
    scaled = build(spec).eval()
    scaled.load_state_dict(model.state_dict())
    calibrate.calibrate(scaled, inputs(spec), lambda _, block, data: awq.scale_block(block, data, grid))
    assert rel_err(output(scaled, held_out), reference) < 1e-5
    rtn_error = rel_err(output(rounded(model, grid), held_out), reference)
    assert rel_err(output(rounded(scaled, grid), held_out), reference) < 0.7 * rtn_error


def test_clipping_finds_the_least_output_error():
    """For every row and group, the clipped weight's rounded output error over the tokens is the least among
    the candidate ranges (brute force over the rounded outputs themselves)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 64, generator=g)
    x = torch.randn(200, 64, generator=g) * (0.2 + torch.rand(64, generator=g))
    grid = quantize.Grid.of("int4", 16)
    clipped = awq.clipped(w, (x.T @ x).double(), grid)
    errors = []
    for shrink in awq.SHRINKS:
        limit = w.reshape(12, 4, 16).abs().amax(-1, keepdim=True) * shrink
        candidate = w.reshape(12, 4, 16).clamp(-limit, limit).reshape(12, 64)
        d = (grid.fake_quantize(candidate) - w).double().reshape(12, 4, 16)
        errors.append(torch.einsum("tgi,ngi->ntg", x.double().reshape(200, 4, 16), d).pow(2).sum(1))
    best = torch.stack(errors).min(0).values
    d = (grid.fake_quantize(clipped) - w).double().reshape(12, 4, 16)
    ours = torch.einsum("tgi,ngi->ntg", x.double().reshape(200, 4, 16), d).pow(2).sum(1)
    assert rel_err(ours, best) < 1e-9
    assert (ours <= errors[0] * (1 + 1e-9)).all()  # never worse than no clipping


def test_awq_model_is_todays_format_and_reloads_bit_identical(tmp_path):
    spec = ARCHITECTURES["llama-gqa"][0]
    model = awq.quantize_model(build(spec).eval(), inputs(spec), "int4", 32)
    assert model.transforms == [{"name": "quantize", "method": "int4", "group_size": 32, "algorithm": "awq"}]
    assert isinstance(model.transformer.blocks[0].mlp.fc_in.weight, QuantizedWeight)
    ids = torch.randint(0, 100, (2, 11))
    before = model(ids).logits
    save_pretrained(model, tmp_path)
    assert torch.equal(load_model(tmp_path).eval()(ids).logits, before)
