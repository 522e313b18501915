"""csrc/: every .cu compiles with nvcc alone for sm_80 and sm_90; on a GPU the built
llm._C matches float64 torch."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llm.kernels import reference
from tests.conftest import rel_err

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# The defines torch's CUDAExtension passes: the kernels must not rely on implicit half conversions.
TORCH_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "csrc/ holds no .cu files"
    procs = [
        subprocess.Popen(
            [
                "nvcc",
                "-c",
                "-std=c++17",
                # Compile and assemble for the real architecture without the slow optimisation
                # passes: this checks the source, not the speed.
                "-Xcicc",
                "-O0",
                "-Xptxas",
                "-O0",
                *TORCH_DEFINES,
                f"-arch=sm_{arch}",
                str(src),
                "-o",
                str(tmp_path / f"{src.stem}_{arch}.o"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in sources
        for arch in ("80", "90")
    ]
    failures = [(p.args, p.communicate()[0]) for p in procs]
    failures = [(args, out) for (args, out), p in zip(failures, procs) if p.returncode != 0]
    assert not failures, "\n".join(f"{' '.join(a)}\n{out}" for a, out in failures)


def _cases():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)):
        for shape in ((3, 37, 129), (64, 1000), (16, 4096), (8, 8192), (7, 4095)):
            yield dtype, tol, shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol, shape", list(_cases()))
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_cuda_norms_match_float64(op, dtype, tol, shape):
    cuda_norms = pytest.importorskip("llm.kernels.cuda_norms")
    x = (torch.randn(shape, device="cuda") * 2 + 0.3).to(dtype)
    w = torch.randn(shape[-1], device="cuda").to(dtype)
    b = torch.randn(shape[-1], device="cuda").to(dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    params = (w, b) if op == "layer_norm" else (w,)
    eps = 1e-5
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    out = getattr(cuda_norms, op)(*leaves, eps)
    out.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref = getattr(reference, op)(*ref_leaves, eps)
    ref.backward(dy.double())
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) < tol


@pytest.mark.gpu
def test_cuda_norms_without_weight():
    cuda_norms = pytest.importorskip("llm.kernels.cuda_norms")
    x = torch.randn(33, 2048, device="cuda", requires_grad=True)
    out = cuda_norms.rms_norm(x, None, 1e-6)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    reference.rms_norm(x64, None, 1e-6).sum().backward()
    assert rel_err(out, reference.rms_norm(x64, None, 1e-6)) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-4
