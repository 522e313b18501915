"""Compiled Triton kernels in fp16 / bf16 on a GPU against float64 torch (bf16/fp16 tolerance 1e-2)."""

import pytest
import torch

from llm.kernels import reference
from tests.conftest import rel_err

pytestmark = pytest.mark.gpu
LOW_PRECISION = [torch.float16, torch.bfloat16]


def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(3, 37, 129), (4, 512, 4096), (2, 256, 8192)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_triton_norms_low_precision(op, shape, dtype):
    from llm.kernels import triton_layer_norm, triton_rms_norm

    module = triton_layer_norm if op == "layer_norm" else triton_rms_norm
    x = torch.randn(shape, device="cuda").to(dtype)
    w = torch.randn(shape[-1], device="cuda").to(dtype)
    params = (w, torch.randn(shape[-1], device="cuda").to(dtype)) if op == "layer_norm" else (w,)
    dy = torch.randn(shape, device="cuda").to(dtype)
    out, grads = _grads(lambda *t: getattr(module, op)(*t, 1e-5), (x, *params), dy)
    ref, ref_grads = _grads(
        lambda *t: getattr(reference, op)(*t, 1e-5), [t.double() for t in (x, *params)], dy.double()
    )
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-2


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_triton_cross_entropy_low_precision(dtype):
    from llm.kernels import triton_cross_entropy

    rows, dim, vocab = 1000, 256, 50257
    hidden = torch.randn(rows, dim, device="cuda").to(dtype)
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).to(dtype)
    bias = torch.randn(vocab, device="cuda").to(dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    one = torch.tensor(1.0, device="cuda")
    out, grads = _grads(
        lambda h, w, b: triton_cross_entropy.linear_cross_entropy(h, w, labels, b, chunk_size=8192),
        (hidden, weight, bias),
        one,
    )
    ref, ref_grads = _grads(
        lambda h, w, b: reference.linear_cross_entropy(h, w, labels, b),
        [t.double() for t in (hidden, weight, bias)],
        one.double(),
    )
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, r) < 1e-2
