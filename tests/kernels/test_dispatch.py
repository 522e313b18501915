"""Backend choice: auto, named backends, recipe and environment overrides, measured orders."""

import json

import pytest
import torch

from llm import kernels
from llm.kernels import dispatch, reference
from tests.conftest import rel_err


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("LLM_KERNELS", raising=False)
    saved_order = {device: dict(order) for device, order in dispatch.AUTO_ORDER.items()}
    yield
    for op in dispatch.OPS:
        dispatch.set_backend(op, "auto")
    dispatch.AUTO_ORDER.clear()
    dispatch.AUTO_ORDER.update(saved_order)


def test_auto_on_cpu_is_torch_for_every_op_but_the_quantized_linears():
    for op in set(dispatch.OPS) - set(dispatch.QUANTIZED_OPS):
        name, fn = dispatch.resolve(op, "auto", "cpu")
        assert name == "torch"
        assert fn is getattr(reference, op)


@pytest.mark.parametrize(
    "op, backend, reason",
    [
        ("layer_norm", "cuda", "CUDA device"),
        ("rms_norm", "apex", "CUDA device"),
        ("attention", "flash_attn", "CUDA device"),
        ("linear_cross_entropy", "cuda", "no cuda implementation"),
    ],
)
def test_named_unavailable_backend_raises_with_its_reason(op, backend, reason):
    with pytest.raises(kernels.BackendUnavailable, match=reason):
        dispatch.resolve(op, backend, "cpu")


def test_missing_extension_is_named_on_a_cuda_device():
    reason = dispatch.why_not("rms_norm", "cuda", "cuda")
    assert reason is not None and "llm._C" in reason


def test_triton_on_cpu_without_the_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(kernels.BackendUnavailable, match="Triton needs a GPU"):
        kernels.rms_norm(torch.randn(2, 8), None, backend="triton")


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.layer_norm(torch.randn(2, 4), None, None, backend="fast")
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.set_backend("softmax", "torch")


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "rms_norm=triton, layer_norm=torch")
    assert dispatch.resolve("rms_norm", "auto", "cpu")[0] == "triton"
    assert dispatch.resolve("layer_norm", "auto", "cpu")[0] == "torch"
    x, w = torch.randn(3, 40), torch.randn(40)
    assert rel_err(kernels.rms_norm(x, w), reference.rms_norm(x.double(), w.double(), 1e-6)) < 1e-5
    monkeypatch.setenv("LLM_KERNELS", "rms_norm=cuda")
    with pytest.raises(kernels.BackendUnavailable, match="rms_norm: backend 'cuda'"):
        kernels.rms_norm(x, w)
    monkeypatch.setenv("LLM_KERNELS", "rms_norm")
    with pytest.raises(ValueError, match="op=backend"):
        kernels.rms_norm(x, w)


def test_use_overrides_auto_in_its_block_and_restores_it():
    with kernels.use({"layer_norm": "triton"}):
        assert dispatch.resolve("layer_norm", "auto", "cpu")[0] == "triton"
        assert dispatch.resolve("rms_norm", "auto", "cpu")[0] == "torch"
        with kernels.use({"layer_norm": "auto"}):
            assert dispatch.resolve("layer_norm", "auto", "cpu")[0] == "torch"
        assert dispatch.resolve("layer_norm", "auto", "cpu")[0] == "triton"
    assert dispatch.resolve("layer_norm", "auto", "cpu")[0] == "torch"


def test_explicit_backend_beats_overrides(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "layer_norm=cuda")
    assert dispatch.resolve("layer_norm", "torch", "cpu")[0] == "torch"


def test_auto_never_fails_when_no_preferred_backend_can_run():
    dispatch.set_auto_order({"layer_norm": ("apex", "cuda")}, device="cuda")
    assert dispatch.resolve("layer_norm", "auto", "cuda")[0] == "torch"


def test_auto_skips_a_backend_that_declines_the_call():
    dispatch.set_auto_order({"rms_norm": ("triton", "torch")}, device="cuda")
    assert dispatch.resolve("rms_norm", "auto", "cuda", x=torch.empty(1, 16))[0] == "triton"
    assert dispatch.resolve("rms_norm", "auto", "cuda", x=torch.empty(1, 70000))[0] == "torch"


def test_available_backends_lists_every_backend_with_a_reason():
    available = kernels.available_backends("layer_norm", "cpu")
    assert set(available) == set(dispatch.BACKENDS)
    assert available["torch"] is None
    assert "CUDA device" in available["cuda"]


def test_auto_order_from_bench_results(tmp_path):
    def row(op, backend, shape, time_ms, device="cuda"):
        return {
            "op": op,
            "backend": backend,
            "shape": shape,
            "dtype": "bf16",
            "pass": "fwd",
            "device": device,
            "time_ms": time_ms,
        }

    rows = [
        row("rms_norm", "torch", "a", 2.0),
        row("rms_norm", "triton", "a", 1.0),
        row("rms_norm", "cuda", "a", 0.5),
        row("rms_norm", "torch", "b", 4.0),
        row("rms_norm", "triton", "b", 1.0),
        row("rms_norm", "cuda", "b", 4.0),  # geometric mean: cuda 0.5x, triton 0.35x of torch
        row("attention", "torch", "a", 1.0),
        row("attention", "triton", "a", 3.0),
        row("layer_norm", "torch", "a", 1.0, device="cpu"),  # CPU rows say nothing about a GPU
    ]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"rows": rows}))
    order = dispatch.auto_order_from_results(path)
    assert order == {"rms_norm": ("triton", "cuda", "torch"), "attention": ("torch", "triton")}
    dispatch.set_auto_order(order)
    assert dispatch.AUTO_ORDER["cuda"]["rms_norm"] == ("triton", "cuda", "torch")
    assert dispatch.AUTO_ORDER["cuda"]["layer_norm"] != ()


def test_backends_decline_calls_they_cannot_take():
    from llm.kernels import cuda_norms, flash_attn_backend

    x = torch.empty(2, 4096, dtype=torch.bfloat16)
    assert cuda_norms.rms_norm_unsupported(x=x, weight=torch.empty(4096, dtype=torch.bfloat16)) is None
    assert "dtype" in cuda_norms.layer_norm_unsupported(x=x, weight=torch.empty(4096), bias=None)
    assert "8200" in cuda_norms.rms_norm_unsupported(x=torch.empty(1, 8200, dtype=torch.bfloat16))
    assert "4097" in cuda_norms.rms_norm_unsupported(x=torch.empty(1, 4097, dtype=torch.bfloat16))
    assert cuda_norms.rms_norm_unsupported(x=torch.empty(1, 4095, dtype=torch.bfloat16)) is None
    assert "float64" in cuda_norms.rms_norm_unsupported(x=torch.empty(1, 8, dtype=torch.float64))
    q = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
    assert flash_attn_backend.attention_unsupported(q=q) is None
    assert "padding" in flash_attn_backend.attention_unsupported(
        q=q, key_padding_mask=torch.ones(1, 8, dtype=torch.bool)
    )
    assert "fp16/bf16" in flash_attn_backend.attention_unsupported(q=q.float())


def test_bad_names_and_unrunnable_backends_are_user_errors():
    from llm.errors import UserError

    with pytest.raises(UserError, match="unknown backend 'fastest'"):
        kernels.check_names({"rms_norm": "fastest"})
    with pytest.raises(UserError, match="cannot run here"):
        dispatch.resolve("layer_norm", "cuda", "cpu")
