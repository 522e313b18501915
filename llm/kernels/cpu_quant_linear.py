"""The "cpu" backend of the quantized linear ops.

int8_linear and int4_linear: llm/kernels/csrc/quant_linear.c through ctypes.

The C file is built at first use for each instruction set the CPU has (AVX2 + FMA, and AVX-512 F where
present; cpu_build.py), and a call runs on the widest build whose vector width VEC fits its shape: the input
width K a multiple of VEC (8 for AVX2, 16 for AVX-512) and, for int4, the group size a multiple of 2 VEC.
x is computed in fp32 (bf16 and fp16 inputs are converted, and the output converted back); the kernels
split the output rows over torch.get_num_threads() OpenMP threads.

int8_dynamic_linear: x quantized per token (as reference.quantize_per_token, in one C pass), torch._int_mm
(oneDNN's int8 GEMM: AVX2, AVX-512 VNNI or AMX) and one C pass that turns its int32 products into the fp32
output in place. FBGEMM's dynamic linear (torch.ops.quantized) was measured and not taken: it quantizes
activations per tensor, which on MiniLM's activations gives 2-2.6x the output error of per-token scales
(4-5x with reduce_range, which AVX2 without VNNI needs against int16 saturation), and its weights can only
be made by quantize_per_channel, which torch deprecates for removal. torch._int_mm is checked once per
process against exact integer products: on this development machine, with oneDNN limited to AVX2 or to
AVX-512 without VNNI (ONEDNN_MAX_CPU_ISA), it returns wrong products, and the backend then declines.

Forward only: with a gradient to compute, "auto" takes the torch backend.
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
        lib.quantize_rows.argtypes = [_PTR] * 3 + [_I64] * 2 + [_INT]
        lib.rescale_rows.argtypes = [_PTR] * 4 + [_I64] * 2 + [_INT]
        built.append((lib.vector_width(), lib))
    if built and errors:
        logger.warning(f"quantized linear CPU kernels: {'; '.join(errors)}; using the other build")
    return tuple(sorted(built, key=lambda b: -b[0])), None if built else errors[0]


def unavailable(device: str, op: str) -> str | None:
    if device != "cpu":
        return "it takes CPU tensors"
    if op == "int8_dynamic_linear":
        return libraries()[1] or int_mm_inexact()
    return libraries()[1]


@functools.cache
def int_mm_inexact() -> str | None:
    """Why torch._int_mm cannot be trusted here (None when its products are exact at decode and batch sizes)."""
    generator = torch.Generator().manual_seed(0)
    b = torch.randint(-128, 128, (384, 96), dtype=torch.int8, generator=generator)
    for rows in (1, 64):
        a = torch.randint(-128, 128, (rows, 384), dtype=torch.int8, generator=generator)
        if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
            return f"torch._int_mm returns inexact int8 products on this CPU ({rows} x 384 @ 384 x 96)"
    return None


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


def int8_dynamic_linear_unsupported(
    x: torch.Tensor | None = None, bias: torch.Tensor | None = None, **call
) -> str | None:
    return None if x is None else unsupported_input(x, bias)


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


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
            _pointer(bias),
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


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    lib, threads = libraries()[0][0][1], torch.get_num_threads()
    n, k = qweight.shape[0], x.shape[-1]
    xf = _fp32(x)
    m = xf.numel() // k
    if m == 0 or n == 0:
        return x.new_empty(*x.shape[:-1], n)
    q, x_scale = torch.empty(m, k, dtype=torch.int8), torch.empty(m)
    lib.quantize_rows(xf.data_ptr(), q.data_ptr(), x_scale.data_ptr(), m, k, threads)
    products = torch._int_mm(q, qweight.t())  # exact int32 dot products, (M, N)
    scale, bias = scale.contiguous(), None if bias is None else _fp32(bias)
    lib.rescale_rows(products.data_ptr(), x_scale.data_ptr(), scale.data_ptr(), _pointer(bias), m, n, threads)
    y = products.view(torch.float32).view(*x.shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
