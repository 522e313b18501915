"""The "cpu" backend of int8_linear and int4_linear: llm/kernels/csrc/quant_linear.c through ctypes.

The C file is built at first use for each instruction set the CPU has (AVX2 + FMA, and AVX-512 F where
present; cpu_build.py), and a call runs on the widest build whose vector width VEC fits its shape: the input
width K a multiple of VEC (8 for AVX2, 16 for AVX-512) and, for int4, the group size a multiple of 2 VEC.
x is computed in fp32 (bf16 and fp16 inputs are converted, and the output converted back); the kernels
split the output rows over torch.get_num_threads() OpenMP threads. Forward only: with a gradient to
compute, "auto" takes the torch backend.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llm.kernels import cpu_build
from llm.log import logger

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def libraries() -> tuple[tuple[tuple[int, ctypes.CDLL], ...], str | None]:
    """((vector width, library), ...) widest first, and why there is none (None when there is one)."""
    isas = cpu_build.cpu_isas()
    if not isas:
        capability = torch.backends.cpu.get_cpu_capability()
        return (), f"the CPU kernels need an x86 CPU with AVX2 and FMA; torch reports CPU capability {capability}"
    built, errors = [], []
    for isa in isas:
        try:
            lib = cpu_build.load("quant_linear.c", isa)
        except cpu_build.BuildError as e:
            errors.append(str(e))
            continue
        lib.int8_linear.argtypes = [_PTR] * 5 + [_I64] * 3 + [_INT]
        lib.int4_linear.argtypes = [_PTR] * 5 + [_I64] * 4 + [_INT]
        built.append((lib.vector_width(), lib))
    if built and errors:
        logger.warning(f"quantized linear CPU kernels: {'; '.join(errors)}; using the other build")
    return tuple(sorted(built, key=lambda b: -b[0])), None if built else errors[0]


def unavailable(device: str) -> str | None:
    if device != "cpu":
        return "the cpu kernels take CPU tensors"
    return libraries()[1]


def _library(columns: int) -> ctypes.CDLL | None:
    """The widest build whose vector width divides `columns`: the input width for int8, half the group size
    for int4 (a vector of bytes holds two columns each). None when no build does."""
    return next((lib for width, lib in libraries()[0] if columns % width == 0), None)


def _narrowest() -> int:
    return min((width for width, _ in libraries()[0]), default=0)


def unsupported_input(x: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why a forward-only kernel (this one or Triton's) cannot take x and bias, or None."""
    if x.dtype not in DTYPES:
        return f"x is {x.dtype}; the kernels take fp32, bf16 or fp16"
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "the kernels compute no gradient, and x or the bias requires one"
    return None


def int8_linear_unsupported(x: torch.Tensor | None = None, bias: torch.Tensor | None = None, **call) -> str | None:
    if x is None:  # asked about the backend in general
        return None
    if _library(x.shape[-1]) is None:
        return f"the input width {x.shape[-1]} is not a multiple of {_narrowest()}"
    return unsupported_input(x, bias)


def int4_linear_unsupported(
    x: torch.Tensor | None = None, group_size: int = 0, bias: torch.Tensor | None = None, **call
) -> str | None:
    if x is None:
        return None
    if group_size % 2 or _library(group_size // 2) is None:
        return f"the group size {group_size} is not a multiple of {2 * _narrowest()}"
    return unsupported_input(x, bias)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _call(kernel, x: torch.Tensor, qweight, scale, bias, *sizes: int) -> torch.Tensor:
    """Run `kernel` on contiguous fp32 copies where needed (none for fp32 x); y (..., N) in x's dtype."""
    n, k = qweight.shape[0], x.shape[-1]
    xf = _fp32(x)
    y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    if y.numel():
        qweight, scale = qweight.contiguous(), scale.contiguous()  # referenced until the call returns
        bias = None if bias is None else _fp32(bias)
        status = kernel(
            xf.data_ptr(),
            qweight.data_ptr(),
            scale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            xf.numel() // k,
            n,
            k,
            *sizes,
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"the quantized linear kernel could not allocate its buffers (x {tuple(x.shape)})")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _call(_library(x.shape[-1]).int8_linear, x, qweight, scale, bias)


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _call(_library(group_size // 2).int4_linear, x, qweight, scale, bias, group_size)
