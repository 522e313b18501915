"""Triton flash attention against softmax(QK^T/sqrt(d))V written out in float64.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (fp32);
with one they run compiled, and the gpu-marked tests add fp16/bf16 at real sizes.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import kernels
from llm.kernels import triton_attention
from llm.models.config import ModelConfig
from llm.tasks import build_model
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention_by_definition(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Float64 softmax(q k^T * scale) v, one masked score matrix per head; rows with no key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    lq, lk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    allowed = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees key j <= i + lk - lq
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        allowed = allowed & (torch.arange(lk, device=q.device)[None, :] <= rows)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), probs, 0.0) @ v


def inputs(b, h, hkv, lq, lk, d, dtype=torch.float32):
    make = lambda heads, length: torch.randn(b, heads, length, d, device=DEVICE, dtype=dtype).requires_grad_()
    return make(h, lq), make(hkv, lk), make(hkv, lk)


def check(q, k, v, tol=1e-5, fn=triton_attention.attention, **kw):
    """Forward and (dq, dk, dv) of `fn` against the float64 definition."""
    out = fn(q, k, v, **kw)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_by_definition(q64, k64, v64, **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    errors = {
        name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads))
    }
    assert all(e < tol for e in errors.values()), errors
    assert out.dtype == q.dtype and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("head_dim", [48, 40])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_odd_shapes(causal, head_dim):
    check(*inputs(2, 3, 3, 37, 37, head_dim), causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_padding_mask(causal):
    mask = torch.ones(3, 37, dtype=torch.bool, device=DEVICE)
    mask[0, 17:] = False  # padded tail, including whole key blocks
    mask[1, :6] = False  # left padding: early causal rows see no key
    mask[2, :] = False  # nothing to attend: zeros, zero gradients
    check(*inputs(3, 2, 2, 37, 37, 40), causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_key_value_heads(kv_heads):
    mask = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    check(*inputs(2, 4, kv_heads, 37, 37, 48), causal=True, key_padding_mask=mask)


def test_small_grids_split_the_query_group():
    """MQA at batch 1 has one dK/dV program per key block: the group is split until the grid is full enough.
    (The tests above run both ways: GQA 2 x 2 heads x 2 blocks unsplit, MQA split in 2.)"""
    assert triton_attention._group_splits(group=4, programs=8, min_programs=8) == 1
    assert triton_attention._group_splits(group=4, programs=4, min_programs=8) == 2
    assert triton_attention._group_splits(group=6, programs=2, min_programs=8) == 6
    assert triton_attention._group_splits(group=32, programs=32, min_programs=264) == 16


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(head_dim):
    check(*inputs(1, 2, 1, 19, 19, head_dim), causal=True)


@pytest.mark.parametrize("lq, lk", [(1, 37), (5, 37), (37, 21)], ids=["decode", "prefix", "more-queries"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_query_and_key_lengths_differ(lq, lk, causal):
    check(*inputs(2, 2, 1, lq, lk, 32), causal=causal)


def test_fp16_inputs_accumulate_in_fp32():
    """fp16 in, fp32 accumulation, P rounded to fp16 for the second product: within the half-precision bound.
    (bf16 runs only compiled, in the gpu-marked tests: Triton's interpreter multiplies bf16 blocks wrongly.)"""
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    check(*inputs(2, 2, 1, 45, 45, 40, torch.float16), tol=1e-2, causal=True, key_padding_mask=mask)


def test_strided_inputs_and_explicit_scale():
    """Heads interleaved in memory, as the model's (b, t, h, d).transpose(1, 2) produces."""
    x = torch.randn(2, 29, 3 * 4 * 32, device=DEVICE)
    q, k, v = (t.view(2, 29, 4, 32).transpose(1, 2).detach().requires_grad_() for t in x.split(128, dim=-1))
    assert not q.is_contiguous()
    check(q, k, v, causal=True, scale=0.3)


def test_through_the_dispatcher_matches_torch_backend():
    q, k, v = inputs(2, 4, 2, 23, 23, 40)
    mask = torch.ones(2, 23, dtype=torch.bool, device=DEVICE)
    mask[0, 15:] = False
    check(
        q, k, v, fn=lambda *a, **kw: kernels.attention(*a, **kw, backend="triton"), causal=True, key_padding_mask=mask
    )
    ours = kernels.attention(q, k, v, causal=False, key_padding_mask=mask, backend="triton")
    torch_out = kernels.attention(q, k, v, causal=False, key_padding_mask=mask, backend="torch")
    assert rel_err(ours, torch_out) < 1e-5


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_nan_input_is_not_hidden():
    q, k, v = inputs(1, 2, 2, 20, 20, 32)
    with torch.no_grad():
        q[0, 1, 7] = float("nan")
    out = triton_attention.attention(q, k, v)
    assert torch.isnan(out[0, 1, 7]).all() and not torch.isnan(out[0, 0]).any()
    assert rel_err(out, attention_by_definition(q, k, v)) == float("inf")


def test_unsupported_calls_name_the_reason():
    q, k, v = inputs(1, 2, 2, 8, 8, 32)
    assert "dropout" in triton_attention.attention_unsupported(q=q, k=k, v=v, dropout_p=0.1)
    assert "float64" in triton_attention.attention_unsupported(q=q.double(), k=k.double(), v=v.double())
    wide = q.new_zeros(1, 2, 8, 160)
    assert "head_dim" in triton_attention.attention_unsupported(q=wide, k=wide, v=wide)
    assert triton_attention.attention_unsupported(q=q, k=k, v=v, causal=True) is None
    assert kernels.available_backends("attention", DEVICE)["triton"] is None
    with pytest.raises(kernels.BackendUnavailable, match="dropout"):
        kernels.attention(q, k, v, dropout_p=0.1, backend="triton")


@pytest.mark.parametrize(
    "arch",
    [
        dict(n_kv_heads=2, norm="rmsnorm", position="rotary", mlp="swiglu", bias=False),
        dict(family="bert", causal=False, norm_position="post", type_vocab_size=2, mlp="gelu"),
    ],
    ids=["llama-gqa", "bert-padded"],
)
def test_model_with_triton_attention_matches_torch(arch, monkeypatch):
    cfg = ModelConfig(vocab_size=61, max_seq_len=24, d_model=48, n_layers=2, n_heads=4, d_ff=64, **arch)
    cfg.validate()
    model = build_model(cfg, "causal_lm" if cfg.causal else "masked_lm").to(DEVICE)
    launches = []
    launch = triton_attention.FlashAttention.apply
    monkeypatch.setattr(triton_attention.FlashAttention, "apply", lambda *a: launches.append(1) or launch(*a))
    ids = torch.randint(0, 61, (2, 19), device=DEVICE)
    mask = torch.ones(2, 19, dtype=torch.long, device=DEVICE)
    mask[1, 13:] = 0

    def run(backend):
        monkeypatch.setenv("LLM_KERNELS", f"attention={backend}")
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], device=DEVICE)).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_logits, ref_grads = run("torch")
    assert not launches
    logits, grads = run("triton")
    assert len(launches) == cfg.n_layers
    assert rel_err(logits, ref_logits) < 1e-5
    assert len(grads) == len(ref_grads)
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "b, h, hkv, seq, head_dim, causal, padded",
    [(1, 4, 4, 4096, 128, True, False), (2, 8, 2, 1024, 64, False, True), (1, 4, 1, 2047, 128, True, True)],
    ids=["4096x128-causal", "1024x64-gqa-padded", "2047x128-mqa-causal-padded"],
)
def test_half_precision_compiled(dtype, b, h, hkv, seq, head_dim, causal, padded):
    mask = None
    if padded:
        mask = torch.ones(b, seq, dtype=torch.bool, device=DEVICE)
        mask[-1, seq // 3 :] = False
    check(*inputs(b, h, hkv, seq, seq, head_dim, dtype), tol=1e-2, causal=causal, key_padding_mask=mask)


# Run in a fresh process without TRITON_INTERPRET: under the interpreter `triton.jit` makes no compilable kernels.
COMPILE_FOR_AMPERE_AND_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llm.kernels import triton_attention as ta

ints = {"H", "GROUP", "SPLITS", "Lq", "Lk", "LQ_BUCKET", "LK_BUCKET"}
pointer_types = {"LSE": "*fp32", "DELTA": "*fp32", "PAD": "*u8", "DOC_START": "*i32", "DOC_END": "*i32"}
meta = dict(HEAD_DIM=96, BLOCK_D=128, CAUSAL=True, HAS_PAD=True, HAS_DOCS=True, DOT_PRECISION="tf32")
shared_limit = {80: 163 * 1024, 90: 227 * 1024}
for capability in (80, 90):
    for kernel, config in [
        (ta._attn_fwd, ta.FWD_CONFIGS[0]),
        (ta._attn_bwd_dkdv, ta.DKDV_CONFIGS[0]),
        (ta._attn_bwd_dq, ta.DQ_CONFIGS[0]),
        (ta._attn_bwd_delta, triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)),
    ]:
        constants = {k: v for k, v in {**meta, **config.kwargs}.items() if k in kernel.arg_names}
        signature = {
            name: "constexpr" if name in constants
            else "i32" if name.startswith("stride") or name in ints
            else "fp32" if name.endswith("scale")
            else pointer_types.get(name, "*bf16")
            for name in kernel.arg_names
        }
        compiled = triton.compile(
            ASTSource(kernel, signature, constants),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
        assert compiled.asm["cubin"] and compiled.metadata.shared <= shared_limit[capability], kernel.__name__
        print(kernel.__name__, f"sm_{capability}", "shared", compiled.metadata.shared)
"""


def test_kernels_compile_for_ampere_and_hopper():
    """The interpreter never compiles: build every kernel for sm_80 and sm_90 (bf16, head dim 96, causal, padded,
    packed documents: every masking branch) to cubin with Triton's own ptxas, so an error only the GPU compiler
    sees shows up on a CPU machine too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_AMPERE_AND_HOPPER], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("shared") == 8, done.stdout
