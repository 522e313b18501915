"""Quantized linear ops: the layouts against torchao's, the C kernels (every build this CPU can run) and the
int8 GEMM of int8_dynamic_linear against float64 torch, and the slower path "auto" takes without a compiler,
without AVX2 or for a shape the kernels cannot take: still right, and said once."""

import logging
import os
import re
import threading

import pytest
import torch

from llm import kernels
from llm.kernels import cpu_build, cpu_quant_linear, dispatch, reference
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not cpu_build.cpu_isas(), reason="the CPU kernels need x86 with AVX2 and FMA")
WIDTHS = [8, 16]  # AVX2, AVX-512
# int8_dynamic_linear's cpu backend declines where torch._int_mm is inexact (its fallback is tested below)
exact_int_mm = pytest.mark.skipif(bool(cpu_quant_linear.int_mm_inexact()), reason="torch._int_mm is inexact here")


@pytest.fixture(params=WIDTHS, ids=lambda w: f"width{w}")
def width(request, monkeypatch):
    """Runs the test on one build: the others are hidden from the backend."""
    built = tuple(b for b in cpu_quant_linear.libraries()[0] if b[0] == request.param)
    if not built:
        pytest.skip(f"this CPU has no build of vector width {request.param}")
    monkeypatch.setattr(cpu_quant_linear, "libraries", lambda: (built, None))
    return request.param


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build cache, nothing loaded, nothing announced; the same again afterwards."""
    monkeypatch.setenv("LLM_EXTENSIONS_DIR", str(tmp_path / "extensions"))

    def clear():
        cpu_quant_linear.libraries.cache_clear()
        cpu_quant_linear.int_mm_inexact.cache_clear()
        cpu_build._identity.cache_clear()
        dispatch._ANNOUNCED.clear()

    clear()
    yield tmp_path
    monkeypatch.undo()
    clear()


def int8_weights(n, k):
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.02 + 1e-3


def int4_weights(n, k, group):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    return reference.int4_pack(q), torch.rand(n, k // group) * 0.2 + 1e-2


def test_layout_matches_torchao_and_the_saved_nibbles():
    """The ops' dequantized weights are torchao's, from the tensors `llm compress quantize` saves."""
    q = pytest.importorskip("torchao.quantization")
    from llm.compress.quantize import pack_int4

    linear8, linear4 = torch.nn.Linear(96, 21), torch.nn.Linear(96, 21)
    q.quantize_(linear8, q.Int8WeightOnlyConfig())
    q.quantize_(linear4, q.IntxWeightOnlyConfig(torch.int4, q.PerGroup(32), scale_dtype=torch.float16))
    w8, w4 = linear8.weight, linear4.weight
    assert not w8.zero_point.any() and not w4.zero_point.any()  # symmetric
    ours8 = reference.dequantize_int8(w8.qdata, w8.scale.flatten())
    assert torch.equal(ours8, w8.dequantize())
    packed = reference.int4_pack(w4.qdata)
    assert torch.equal(packed, pack_int4(w4.qdata) ^ 0x88)
    assert torch.equal(reference.dequantize_int4(packed, w4.scale.float(), 32), w4.dequantize())
    assert torch.equal(reference.int4_unpack(packed), w4.qdata)


def test_activations_are_quantized_as_torchao_does():
    q = pytest.importorskip("torchao.quantization")
    x = torch.randn(2, 37, 96) * torch.rand(2, 37, 1) * 3
    qx, scale = reference.quantize_per_token(x)
    theirs = q.Int8Tensor.from_hp(x, q.PerRow())
    assert torch.equal(qx, theirs.qdata) and torch.equal(scale, theirs.scale)


@exact_int_mm  # torchao's int8 matmul is as wrong as torch._int_mm where that is inexact
def test_int8_dynamic_is_torchaos_layer():
    q = pytest.importorskip("torchao.quantization")
    linear = torch.nn.Linear(96, 21)
    q.quantize_(linear, q.Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(2, 37, 96)
    with torch.no_grad():
        out = kernels.int8_dynamic_linear(x, linear.weight.qdata, linear.weight.scale.flatten(), linear.bias)
        assert rel_err(out, linear(x)) < 1e-6


def test_the_c_pass_quantizes_as_the_reference(width):
    x = torch.randn(37, 129) * torch.rand(37, 1) * 3
    x[3] = 0  # a row of zeros: the scale's floor
    q, scale = torch.empty(37, 129, dtype=torch.int8), torch.empty(37)
    lib = cpu_quant_linear.libraries()[0][0][1]
    lib.quantize_rows(x.data_ptr(), q.data_ptr(), scale.data_ptr(), 37, 129, 1)
    expected_q, expected_scale = reference.quantize_per_token(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale.flatten())


@exact_int_mm
@pytest.mark.parametrize("shape", [(1, 129), (3, 37, 129), (70, 144)], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_dynamic_matches_float64(shape, has_bias):
    x = torch.randn(shape) + 0.5
    qweight, scale = int8_weights(29, shape[-1])
    bias = torch.randn(29) if has_bias else None
    out = kernels.int8_dynamic_linear(x, qweight, scale, bias, backend="cpu")
    assert out.shape == (*shape[:-1], 29) and out.dtype == torch.float32
    assert rel_err(out, reference.int8_dynamic_linear(x.double(), qweight, scale, bias)) < 1e-5
    low = kernels.int8_dynamic_linear(x.bfloat16(), qweight, scale, bias, backend="cpu")
    assert low.dtype == torch.bfloat16
    assert rel_err(low, reference.int8_dynamic_linear(x.bfloat16().double(), qweight, scale, bias)) < 1e-2


@pytest.mark.parametrize("shape", [(1, 144), (4, 144), (3, 37, 144), (70, 144)], ids=str)
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_matches_float64(width, shape, has_bias):
    """K = 144 is an odd number of vectors; N = 29 leaves a partial block; 70 rows take the prefill path."""
    x = torch.randn(shape) + 0.5
    qweight, scale = int8_weights(29, shape[-1])
    bias = torch.randn(29) if has_bias else None
    out = kernels.int8_linear(x, qweight, scale, bias, backend="cpu")
    assert out.shape == (*shape[:-1], 29) and out.dtype == torch.float32
    assert rel_err(out, reference.int8_linear(x.double(), qweight, scale, bias)) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 70])
@pytest.mark.parametrize(
    "width, group", [(w, g) for w in WIDTHS for g in (16, 32, 48, 64, 128) if g % (2 * w) == 0], indirect=["width"]
)
def test_int4_matches_float64_for_every_fast_group_size(width, group, rows):
    """Odd group counts (K = 3 or 5 groups); rows of x with a nonzero mean (the -8 offset's sum of x)."""
    k = group * (3 if group > 32 else 5)
    x = torch.randn(rows, k) + 1.0
    qweight, scale = int4_weights(37, k, group)
    bias = torch.randn(37)
    out = kernels.int4_linear(x, qweight, scale, group, bias, backend="cpu")
    assert rel_err(out, reference.int4_linear(x.double(), qweight, scale, group, bias)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    x = torch.randn(3, 5, 128).to(dtype)
    q8, s8 = int8_weights(19, 128)
    q4, s4 = int4_weights(19, 128, 32)
    out8 = kernels.int8_linear(x, q8, s8, backend="cpu")
    out4 = kernels.int4_linear(x, q4, s4, 32, backend="cpu")
    assert out8.dtype == out4.dtype == dtype
    assert rel_err(out8, reference.int8_linear(x.double(), q8, s8)) < 1e-2
    assert rel_err(out4, reference.int4_linear(x.double(), q4, s4, 32)) < 1e-2


@pytest.mark.parametrize("group", [2, 6, 8, 10, 16, 24, 32, 64, 96, 128])
def test_every_even_group_size_is_right_under_auto(group):
    """Whatever `llm compress quantize` accepts: the kernels take some sizes, torch the rest."""
    k = group * 3
    x = torch.randn(2, 7, k)
    qweight, scale = int4_weights(13, k, group)
    out = kernels.int4_linear(x, qweight, scale, group)
    assert rel_err(out, reference.int4_linear(x.double(), qweight, scale, group)) < 1e-5


def test_auto_takes_the_kernels_and_torch_where_a_gradient_is_needed():
    x = torch.randn(2, 64)
    q, s = int8_weights(8, 64)
    assert dispatch.resolve("int8_linear", "auto", "cpu", x=x)[0] == "cpu"
    assert dispatch.resolve("int4_linear", "auto", "cpu", x=x, group_size=32)[0] == "cpu"
    expected = "torch" if cpu_quant_linear.int_mm_inexact() else "cpu"
    assert dispatch.resolve("int8_dynamic_linear", "auto", "cpu", x=x)[0] == expected
    leaf = x.clone().requires_grad_()
    assert dispatch.resolve("int8_linear", "auto", "cpu", x=leaf)[0] == "torch"
    kernels.int8_linear(leaf, q, s).sum().backward()
    assert rel_err(leaf.grad, reference.dequantize_int8(q, s).sum(0).expand(2, 64)) < 1e-6


def _warnings(caplog, op):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith(op)]


def _right_and_said_once(caplog, match):
    x = torch.randn(3, 37, 96)
    q8, s8 = int8_weights(11, 96)
    q4, s4 = int4_weights(11, 96, 32)
    with caplog.at_level(logging.WARNING, logger="llm"):
        for _ in range(3):
            assert rel_err(kernels.int8_linear(x, q8, s8), reference.int8_linear(x.double(), q8, s8)) < 1e-5
            assert rel_err(kernels.int4_linear(x, q4, s4, 32), reference.int4_linear(x.double(), q4, s4, 32)) < 1e-5
    for op in ("int8_linear", "int4_linear"):
        (line,) = _warnings(caplog, op)
        assert match in line.getMessage() and "using torch" in line.getMessage()
    with pytest.raises(kernels.BackendUnavailable, match=re.escape(match)):
        kernels.int8_linear(x, q8, s8, backend="cpu")


def test_without_a_compiler_torch_runs_and_says_why_once(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    _right_and_said_once(caplog, "no C compiler found")


def test_a_failing_compiler_is_named_with_its_error(fresh, monkeypatch, caplog):
    cc = fresh / "broken-cc"
    cc.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo "broken 1.0" && exit 0\necho "x.c:1: error: broken" >&2\nexit 1\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    _right_and_said_once(caplog, "broken-cc failed on quant_linear.c (avx2): x.c:1: error: broken")
    assert not list((fresh / "extensions").glob("*.tmp"))


def test_without_avx2_torch_runs_and_says_why_once(fresh, monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    _right_and_said_once(caplog, "need an x86 CPU with AVX2 and FMA")


def test_an_inexact_int8_gemm_is_not_used(fresh, monkeypatch, caplog):
    """torch._int_mm saturating as oneDNN's kernels without VNNI do here: torch's slower path runs instead."""
    exact = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: exact(a.clamp(-64, 63), b))
    x = torch.randn(3, 37, 96)
    q, s = int8_weights(11, 96)
    with caplog.at_level(logging.WARNING, logger="llm"):
        for _ in range(2):
            out = kernels.int8_dynamic_linear(x, q, s)
            assert rel_err(out, reference.int8_dynamic_linear(x.double(), q, s)) < 1e-5
    (line,) = _warnings(caplog, "int8_dynamic_linear")
    assert "torch._int_mm returns inexact int8 products" in line.getMessage()
    assert kernels.int8_linear(x, q, s, backend="cpu") is not None  # the weight-only kernels are unaffected


def test_a_shape_the_kernels_cannot_take_runs_on_torch_and_is_said_once(caplog):
    dispatch._ANNOUNCED.clear()
    x = torch.randn(3, 37, 100)  # 100 columns: not a multiple of 8
    q8, s8 = int8_weights(5, 100)
    q4, s4 = int4_weights(5, 100, 10)
    reason8 = cpu_quant_linear.int8_linear_unsupported(x=x)
    reason4 = cpu_quant_linear.int4_linear_unsupported(x=x, group_size=10)
    assert reason8 == "the input width 100 is not a multiple of 8"
    assert reason4 == "the group size 10 is not a multiple of 16"
    with caplog.at_level(logging.WARNING, logger="llm"):
        for _ in range(2):
            assert rel_err(kernels.int8_linear(x, q8, s8), reference.int8_linear(x.double(), q8, s8)) < 1e-5
            assert rel_err(kernels.int4_linear(x, q4, s4, 10), reference.int4_linear(x.double(), q4, s4, 10)) < 1e-5
    assert [len(_warnings(caplog, op)) for op in ("int8_linear", "int4_linear")] == [1, 1]
    assert reason8 in _warnings(caplog, "int8_linear")[0].getMessage()
    with pytest.raises(kernels.BackendUnavailable, match="not a multiple of 16"):
        kernels.int4_linear(x, q4, s4, 10, backend="cpu")


def test_a_layer_learns_once_whether_its_shape_takes_the_slow_path():
    def reason(op, width, **call):
        return dispatch.fallback_reason(op, "cpu", x=torch.empty(0, width), **call)

    assert reason("int8_linear", 768) is None and reason("int4_linear", 768, group_size=32) is None
    assert reason("int8_linear", 100) == "the input width 100 is not a multiple of 8"
    assert reason("int4_linear", 96, group_size=6) == "the group size 6 is not a multiple of 16"
    assert "no faster backend than torch on cuda" in dispatch.fallback_reason("int8_dynamic_linear", "cuda")


def test_calls_that_do_not_fit_the_layout_raise():
    x = torch.randn(2, 64)
    q8, s8 = int8_weights(8, 64)
    with pytest.raises(ValueError, match=r"expected x \(\.\.\., 64\)"):
        kernels.int8_linear(torch.randn(2, 63), q8, s8)
    with pytest.raises(ValueError, match="scale torch.float32"):
        kernels.int8_linear(x, q8, s8.half())
    with pytest.raises(ValueError, match="group_size 24 does not divide the input width 64"):
        kernels.int4_linear(x, *int4_weights(8, 64, 32), 24)


def test_ranks_that_build_together_compile_once(fresh, monkeypatch):
    """Two builders of the same library: one compiles under the lock, the other loads its file."""
    log = fresh / "compiles"
    cc = fresh / "counting-cc"
    cc.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo x >> {log}\nexec {cpu_build.compiler()} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_build.load("quant_linear.c", "avx2"))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(lib.vector_width() == 8 for lib in results)
    assert log.read_text().count("x") == 1
    (library,) = (fresh / "extensions").glob("*.so")
    assert library.name.startswith("quant_linear-avx2-")
    assert os.path.getsize(library) > 0
