"""The building blocks against float64 computations written from their definitions."""

import math

import pytest
import torch

from llm.models.config import ModelConfig
from llm.models.layers import Attention, Norm, Rotary, apply_rotary, sinusoidal_table
from tests.conftest import rel_err


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, max_seq_len=64, d_model=48, n_layers=2, n_heads=4, d_ff=80)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def attention_by_definition(attn: Attention, x, causal, key_padding_mask=None):
    """concat_h softmax(Q_h K_h^T / sqrt(d_k)) V_h, then W^O, in float64, one head at a time."""
    x = x.double()
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double() if attn.qkv.bias is not None else 0
    qkv = x @ w.t() + b
    dh, h, kv = attn.head_dim, attn.n_heads, attn.kv_heads
    q, k, v = qkv.split([h * dh, kv * dh, kv * dh], dim=-1)
    t = x.shape[1]
    heads = []
    for i in range(h):
        j = i // (h // kv)  # the key/value head this query head shares
        qi, kj, vj = q[..., i * dh : (i + 1) * dh], k[..., j * dh : (j + 1) * dh], v[..., j * dh : (j + 1) * dh]
        scores = qi @ kj.transpose(1, 2) / math.sqrt(dh)
        allowed = torch.ones(x.shape[0], t, t, dtype=torch.bool)
        if causal:
            allowed &= torch.tril(torch.ones(t, t, dtype=torch.bool))
        if key_padding_mask is not None:
            allowed &= key_padding_mask[:, None, :].bool()
        scores = scores.masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vj)
    out = torch.cat(heads, dim=-1) @ attn.proj.weight.double().t()
    return out + (attn.proj.bias.double() if attn.proj.bias is not None else 0)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_definition(n_kv_heads, causal):
    cfg = small_config(n_kv_heads=n_kv_heads, causal=causal)
    attn = Attention(cfg, 0)
    x = torch.randn(3, 11, cfg.d_model)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    mask[2, :3] = False  # left padding
    # causal + left padding leaves early rows with no key; compare the rows that have one
    out = attn(x, key_padding_mask=mask)
    ref = attention_by_definition(attn, x, causal, mask)
    rows = torch.isfinite(ref).all(-1)
    assert rel_err(out[rows], ref[rows]) < 1e-5
    assert torch.equal(out[~rows], attn.proj.bias.expand_as(out)[~rows])  # zeros before W^O


def test_sinusoidal_table_is_the_formula():
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rotary_is_a_complex_rotation():
    d, theta = 16, 10000.0
    x = torch.randn(2, 3, 9, d)
    positions = torch.arange(9)[None]
    cos, sin = Rotary(d, theta)(positions, torch.float32)
    out = apply_rotary(x, cos, sin)
    # dimension i pairs with i + d/2 and turns by pos * theta^(-2i/d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ref = z * torch.exp(1j * positions[0, :, None].double() * freq)
    assert rel_err(out, torch.cat((ref.real, ref.imag), dim=-1)) < 1e-5
    # rotations preserve norms, and scores depend only on relative position
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_match_definition(kind):
    norm = Norm(37, kind, eps=1e-5, bias=True)
    with torch.no_grad():
        norm.weight.normal_()
        if norm.bias is not None:
            norm.bias.normal_()
    x = torch.randn(3, 5, 37) * 3 + 1
    xd = x.double()
    if kind == "layernorm":
        ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref * norm.weight.double() + norm.bias.double()
    else:
        ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert rel_err(norm(x), ref) < 1e-5
