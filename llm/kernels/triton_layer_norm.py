"""LayerNorm in Triton: one program per row forward; backward rows shared by a few
programs that each keep a partial weight/bias gradient, summed once at the end,
so the input is read a single time in the backward pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.kernels import reference
from llm.kernels.triton_utils import as_rows, num_partial_programs, num_warps_for, row_block, too_wide


@triton.jit
def _layer_norm_fwd(
    X, Y, W, B, Mean, Rstd, n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd(
    X,
    DY,
    DX,
    W,
    Mean,
    Rstd,
    DW_partial,
    DB_partial,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    start = first.to(tl.int64) * n_cols  # pointers advance one row per step: no 32-bit overflow
    X += start
    DY += start
    DX += start
    for row in range(first, last):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - tl.load(Mean + row)) * tl.load(Rstd + row), 0.0)
        wdy = dy * w if HAS_WEIGHT else dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (xhat * c1 + c2)) * tl.load(Rstd + row)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        X += n_cols
        DY += n_cols
        DX += n_cols
    if HAS_WEIGHT:
        tl.store(DW_partial + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * n_cols + cols, db, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = as_rows(x)
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = row_block(cols)
        _layer_norm_fwd[(rows,)](
            x2,
            y,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            mean,
            rstd,
            cols,
            eps,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty_like(x2)
        programs = num_partial_programs(x2, rows)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        dw_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device) if weight is not None else None
        db_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device) if bias is not None else None
        block = row_block(cols)
        _layer_norm_bwd[(programs,)](
            x2,
            dy2,
            dx,
            weight if weight is not None else x2,
            mean,
            rstd,
            dw_partial if dw_partial is not None else mean,
            db_partial if db_partial is not None else mean,
            rows,
            cols,
            rows_per_program,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
        db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
        return dx.view_as(dy), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.numel() == 0:  # no rows: nothing to launch
        return reference.layer_norm(x, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, eps)


def layer_norm_unsupported(x: torch.Tensor | None = None, **call) -> str | None:
    return too_wide(x.shape[-1]) if x is not None else None
