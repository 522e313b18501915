"""Weight-only int8 and int4 linear layers in Triton: the "triton" backend of int8_linear and int4_linear.

One program computes a BLOCK_M x BLOCK_N tile of y = x @ W.T + bias. It walks K in BLOCK_K steps, loads
the integer weight tile (int8, or the bytes that hold two int4 columns each), dequantizes it in registers to
x's dtype and accumulates `tl.dot` in fp32, so the dequantized weight never reaches memory. int8 values are
exact in bf16/fp16, so int8's per-channel scale multiplies the fp32 accumulator once at the end; int4
multiplies each nibble - 8 by its group's scale before the dot (any group size). fp32 x uses IEEE fp32 dots
(tf32 would lose about 1e-3), bf16/fp16 x the tensor cores. A decode step (M = 1) pads its rows to 16, the
smallest tile `tl.dot` takes. Layouts: llm/kernels/reference.py. Forward only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.kernels.cpu_quant_linear import unsupported_input

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int8_linear(
    X,
    Q,
    S,
    B,
    Y,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            X + rm[:, None].to(tl.int64) * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        q = tl.load(Q + rn[None, :].to(tl.int64) * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(x, q.to(X.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(S + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(Y + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _int4_linear(
    X,
    Q,
    S,
    B,
    Y,
    M,
    N,
    K,
    GROUP,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            X + rm[:, None].to(tl.int64) * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
        )
        w_mask = (rn[None, :] < N) & (kk[:, None] < K)
        byte = tl.load(Q + rn[None, :].to(tl.int64) * (K // 2) + (kk // 2)[:, None], mask=w_mask, other=0)
        nibble = (byte.to(tl.int32) >> ((kk % 2) * 4)[:, None]) & 0xF  # column 2j: low nibble of byte j
        scale = tl.load(S + rn[None, :].to(tl.int64) * groups + (kk // GROUP)[:, None], mask=w_mask, other=0.0)
        w = (nibble.to(tl.float32) - 8.0) * scale
        acc = tl.dot(x, w.to(X.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(Y + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _launch(kernel, x: torch.Tensor, qweight, scale, bias, *sizes: int) -> torch.Tensor:
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        # the interpreter runs programs one after another: small tiles keep its grids small but > 1
        block_m = 16 if INTERPRET else min(64, max(16, triton.next_power_of_2(m)))
        block_n, block_k = (16, 32) if INTERPRET else (64, 64)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        kernel[grid](
            x2,
            qweight.contiguous(),
            scale.contiguous(),
            bias if bias is not None else scale,
            y,
            m,
            n,
            k,
            *sizes,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    return y.view(*x.shape[:-1], n)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _launch(_int8_linear, x, qweight, scale, bias)


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _launch(_int4_linear, x, qweight, scale, bias, group_size)


def _unsupported(x: torch.Tensor | None = None, bias: torch.Tensor | None = None, **call) -> str | None:
    return None if x is None else unsupported_input(x, bias)


int8_linear_unsupported = int4_linear_unsupported = _unsupported
