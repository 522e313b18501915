"""RMSNorm in Triton with LLaMA's rounding (normalise in fp32, cast to the input
dtype, then scale by the weight). Backward as in triton_layer_norm: a few programs
share the rows and each keeps one partial weight gradient, summed once at the end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.kernels import reference
from llm.kernels.triton_utils import as_rows, num_partial_programs, num_warps_for, row_block, too_wide


@triton.jit
def _rms_norm_fwd(X, Y, W, Rstd, n_cols, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(X.dtype.element_ty)
    if HAS_WEIGHT:
        y = y.to(tl.float32) * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd(
    X,
    DY,
    DX,
    W,
    Rstd,
    DW_partial,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    start = first.to(tl.int64) * n_cols  # pointers advance one row per step: no 32-bit overflow
    X += start
    DY += start
    DX += start
    for row in range(first, last):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = x * rstd
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        else:
            wdy = dy
        dx = (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols)) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        X += n_cols
        DY += n_cols
        DX += n_cols
    if HAS_WEIGHT:
        tl.store(DW_partial + pid * n_cols + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = as_rows(x)
        rows, cols = x2.shape
        out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(rows, cols, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = row_block(cols)
        _rms_norm_fwd[(rows,)](
            x2,
            y,
            weight if weight is not None else x2,
            rstd,
            cols,
            eps,
            HAS_WEIGHT=weight is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty_like(x2)
        programs = num_partial_programs(x2, rows)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        dw_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device) if weight is not None else None
        block = row_block(cols)
        _rms_norm_bwd[(programs,)](
            x2,
            dy2,
            dx,
            weight if weight is not None else x2,
            rstd,
            dw_partial if dw_partial is not None else rstd,
            rows,
            cols,
            rows_per_program,
            HAS_WEIGHT=weight is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.numel() == 0:  # no rows: nothing to launch
        return reference.rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_unsupported(x: torch.Tensor | None = None, **call) -> str | None:
    return too_wide(x.shape[-1]) if x is not None else None
