"""Every Triton kernel of the norms and the fused loss compiles (Triton -> PTX -> cubin) for
sm_80 and sm_90 in bf16, with and without weights. Triton compiles for a named target
without a GPU, so the compiled path is checked here, not only the interpreter. Runs in a
child process: this one imported triton in interpreter mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llm.kernels import triton_cross_entropy as ce, triton_layer_norm as ln, triton_rms_norm as rn

T = "*bf16"
norm_fwd = dict(X=T, Y=T, W=T)
cases = [
    (ln._layer_norm_fwd, dict(norm_fwd, B=T, Mean="*fp32", Rstd="*fp32", n_cols="i32", eps="fp32"),
     ("HAS_WEIGHT", "HAS_BIAS"), 8192),
    (ln._layer_norm_bwd, dict(X=T, DY=T, DX=T, W=T, Mean="*fp32", Rstd="*fp32", DW_partial="*fp32",
     DB_partial="*fp32", n_rows="i32", n_cols="i32", rows_per_program="i32"), ("HAS_WEIGHT", "HAS_BIAS"), 8192),
    (rn._rms_norm_fwd, dict(norm_fwd, Rstd="*fp32", n_cols="i32", eps="fp32"), ("HAS_WEIGHT",), 4096),
    (rn._rms_norm_bwd, dict(X=T, DY=T, DX=T, W=T, Rstd="*fp32", DW_partial="*fp32", n_rows="i32", n_cols="i32",
     rows_per_program="i32"), ("HAS_WEIGHT",), 4096),
    (ce._lse_chunk, dict(Logits=T, Labels="*i64", Max="*fp32", SumExp="*fp32", Target="*fp32", stride="i32",
     v_start="i32", chunk_width="i32"), (), ce.BLOCK_V),
    (ce._grad_chunk, dict(Logits=T, Labels="*i64", Lse="*fp32", Scale="*fp32", stride="i32", v_start="i32",
     chunk_width="i32", ignore_index="i32"), (), ce.BLOCK_V),
]
compiled = []
for fn, signature, flags, block in cases:
    variants = [(True, 80), (True, 90)] + ([(False, 90)] if flags else [])
    for flag_value, capability in variants:
        constexprs = {**{f: flag_value for f in flags}, "BLOCK": block}
        full_signature = {**signature, **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
        assert kernel.asm["cubin"], fn.__name__
        compiled.append(f"{fn.__name__} sm_{capability} {flag_value}")
print(json.dumps(compiled))
"""


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(compiled) == 16
