"""Triton LayerNorm / RMSNorm (interpreter on a CPU) against float64 torch, forward and backward."""

import pytest
import torch

from llm import kernels
from llm.kernels import reference
from tests.conftest import rel_err

triton_layer_norm = pytest.importorskip("llm.kernels.triton_layer_norm")
triton_rms_norm = pytest.importorskip("llm.kernels.triton_rms_norm")

SHAPES = [(3, 37, 129), (2, 11, 1000), (7, 48)]


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_float64(shape, affine):
    x = torch.randn(shape) * 3 + 0.5
    w = torch.randn(shape[-1]) if affine[0] else None
    b = torch.randn(shape[-1]) if affine[1] else None
    x1, w1, b1 = _leaves(x, w, b)
    out = triton_layer_norm.layer_norm(x1, w1, b1, 1e-5)
    dy = torch.randn(shape)
    out.backward(dy)
    x2, w2, b2 = _float64(x, w, b)
    ref = reference.layer_norm(x2, w2, b2, 1e-5)
    ref.backward(dy.double())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5
    assert rel_err(x1.grad, x2.grad) < 1e-5
    if w is not None:
        assert rel_err(w1.grad, w2.grad) < 1e-5
    if b is not None:
        assert rel_err(b1.grad, b2.grad) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_weight", [True, False])
def test_rms_norm_matches_float64(shape, has_weight):
    x = torch.randn(shape) * 2
    w = torch.randn(shape[-1]) if has_weight else None
    x1, w1 = _leaves(x, w)
    out = triton_rms_norm.rms_norm(x1, w1, 1e-6)
    dy = torch.randn(shape)
    out.backward(dy)
    x2, w2 = _float64(x, w)
    ref = reference.rms_norm(x2, w2, 1e-6)
    ref.backward(dy.double())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5
    assert rel_err(x1.grad, x2.grad) < 1e-5
    if w is not None:
        assert rel_err(w1.grad, w2.grad) < 1e-5


def test_norms_through_the_dispatcher():
    x = torch.randn(5, 33)
    w, b = torch.randn(33), torch.randn(33)
    ln = kernels.layer_norm(x, w, b, 1e-5, backend="triton")
    rms = kernels.rms_norm(x, w, 1e-6, backend="triton")
    assert rel_err(ln, reference.layer_norm(x.double(), w.double(), b.double(), 1e-5)) < 1e-5
    assert rel_err(rms, reference.rms_norm(x.double(), w.double(), 1e-6)) < 1e-5


def test_too_wide_rows_are_declined_with_a_reason():
    reason = triton_layer_norm.layer_norm_unsupported(x=torch.empty(1, 70000))
    assert reason and "70000" in reason
    assert triton_rms_norm.rms_norm_unsupported(x=torch.empty(1, 4096)) is None


def test_empty_batches_pass_through():
    x = torch.randn(0, 7, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    assert triton_layer_norm.layer_norm(x, w, None, 1e-5).shape == x.shape
    out = triton_rms_norm.rms_norm(x, w, 1e-6)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
