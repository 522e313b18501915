"""Triton int8 / int4 linear against float64 torch: small fp32 shapes through the interpreter on a CPU, and
model-sized ones in bf16 and fp32 on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import kernels
from llm.kernels import reference
from tests.conftest import rel_err

triton_quant_linear = pytest.importorskip("llm.kernels.triton_quant_linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[2]


def weights(n, k, group, device=DEVICE):
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    s8 = torch.rand(n, device=device) * 0.02 + 1e-3
    q4 = reference.int4_pack(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device))
    s4 = torch.rand(n, k // group, device=device) * 0.2 + 1e-2
    return q8, s8, q4, s4


@pytest.mark.parametrize(
    "shape, group, has_bias",
    [((1, 96), 32, True), ((3, 37, 96), 6, False), ((5, 90), 2, True), ((2, 7, 96), 96, False)],
    ids=str,
)
def test_triton_quantized_linear_matches_float64(shape, group, has_bias):
    """M = 1 and M > 1, N = 21 (a partial tile), K not a multiple of the tile, odd and single group counts."""
    x = torch.randn(shape, device=DEVICE) + 0.5
    q8, s8, q4, s4 = weights(21, shape[-1], group)
    bias = torch.randn(21, device=DEVICE) if has_bias else None
    out8 = kernels.int8_linear(x, q8, s8, bias, backend="triton")
    out4 = kernels.int4_linear(x, q4, s4, group, bias, backend="triton")
    assert out8.shape == out4.shape == (*shape[:-1], 21)
    assert rel_err(out8, reference.int8_linear(x.double(), q8, s8, bias)) < 1e-5
    assert rel_err(out4, reference.int4_linear(x.double(), q4, s4, group, bias)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 300])
@pytest.mark.parametrize("n, k, group", [(4096, 4096, 128), (11008, 4096, 32), (4096, 11008, 64)])
def test_triton_quantized_linear_on_a_gpu(dtype, rows, n, k, group):
    """LLaMA-7B projections: decode, a few rows, prefill; bf16 within 1e-2, fp32 (IEEE dots) within 1e-5."""
    x = torch.randn(rows, k, device="cuda").to(dtype)
    q8, s8, q4, s4 = weights(n, k, group, "cuda")
    bias = torch.randn(n, device="cuda").to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        assert kernels.dispatch.resolve("int4_linear", "auto", "cuda", x=x, group_size=group)[0] == "triton"
        out8 = kernels.int8_linear(x, q8, s8, bias)
        out4 = kernels.int4_linear(x, q4, s4, group, bias)
    assert out8.dtype == out4.dtype == dtype
    assert rel_err(out8, reference.int8_linear(x.double(), q8, s8, bias)) < tolerance
    assert rel_err(out4, reference.int4_linear(x.double(), q4, s4, group, bias)) < tolerance


COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llm.kernels import triton_quant_linear as ql

compiled = []
for fn, extra, dtype, capability in [
    (ql._int8_linear, {"Q": "*i8"}, "bf16", 90),
    (ql._int4_linear, {"Q": "*u8", "GROUP": "i32"}, "bf16", 90),
    (ql._int4_linear, {"Q": "*u8", "GROUP": "i32"}, "fp32", 80),
]:
    tensors = dict(X=f"*{dtype}", S="*fp32", B=f"*{dtype}", Y=f"*{dtype}", M="i32", N="i32", K="i32")
    precision = "tf32" if dtype == "bf16" else "ieee"
    constexprs = dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT_PRECISION=precision)
    signature = {**tensors, **extra, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"], fn.__name__
    compiled.append(f"{fn.__name__} {dtype} sm_{capability}")
print(json.dumps(compiled))
"""


def test_triton_quantized_linear_compiles_for_a_gpu(tmp_path):
    """The compiled path, not only the interpreter's, without a GPU: Triton compiles for a named target
    (in a child process, as this one imported triton in interpreter mode). About 6 s: three compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 3
