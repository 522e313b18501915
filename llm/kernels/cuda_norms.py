"""LayerNorm and RMSNorm from csrc/ (the compiled `llm._C`) as autograd Functions."""

from __future__ import annotations

import torch

# Elements per 16-byte vector. The backward kernel keeps five fp32 values per element
# in registers: rows up to 8192 elements fit a block, 4096 when they cannot be vectorized.
_VECTOR = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
MAX_COLS, MAX_COLS_UNVECTORIZED = 8192, 4096


def _ext():
    from llm import _C

    return _C


class CudaLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, mean, rstd = _ext().layer_norm_fwd(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _ext().layer_norm_bwd(
            dy.reshape(x2.shape).contiguous(), x2, weight, ctx.has_bias, mean, rstd
        )
        return dx.view_as(dy), dweight, dbias if ctx.has_bias else None, None


class CudaRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _ext().rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dweight = _ext().rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, weight, rstd)
        return dx.view_as(dy), dweight, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return CudaLayerNorm.apply(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return CudaRMSNorm.apply(x, weight, eps)


def _unsupported(x: torch.Tensor | None, params: tuple[torch.Tensor | None, ...]) -> str | None:
    if x is None:
        return None
    if x.dtype not in _VECTOR:
        return f"the CUDA norms take float32, float16 or bfloat16, not {x.dtype}"
    for p in params:
        if p is not None and p.dtype != x.dtype:
            return f"the CUDA norms need weight/bias in the input's dtype ({x.dtype}), not {p.dtype}"
    cols, vector = x.shape[-1], _VECTOR[x.dtype]
    widest = MAX_COLS if cols % vector == 0 else MAX_COLS_UNVECTORIZED
    if cols > widest:
        return f"rows of {cols} elements exceed the {widest} the CUDA norms keep in registers"
    return None


def layer_norm_unsupported(x=None, weight=None, bias=None, **call) -> str | None:
    return _unsupported(x, (weight, bias))


def rms_norm_unsupported(x=None, weight=None, **call) -> str | None:
    return _unsupported(x, (weight,))
