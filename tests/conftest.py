"""Test-wide settings: CPU DeepSpeed, Triton interpreter without a GPU, one thread per process, seeds, GPU marker."""

import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One ninja for every test and every process it starts (this interpreter's venv first, as tests/launch gives its
# ranks): DeepSpeed's JIT-built CPU op is rebuilt (minutes) whenever a different ninja version reads its build log.
_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run on a CPU only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_dist_env():
    """A trainer built in this process sets RANK, MASTER_PORT, ... and keeps its process group (and the
    port) alive; later tests' subprocesses must not inherit that port, so the variables are restored."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _llm_log_reaches_caplog():
    """An in-process run sets the `llm` logger not to propagate (llm.log.setup_logging); caplog reads records
    at the root logger, so every test starts with them propagating at INFO."""
    from llm.log import logger

    logger.propagate = True
    logger.setLevel(logging.INFO)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


TASK_OPTIONS = ("num_labels", "labels", "pooling", "temperature", "nsp", "mlm_probability", "mask_ratio")


def build(spec: dict, **kw):
    """A freshly built model from one mapping: ModelConfig fields plus `task` (a name) and its options."""
    from llm.tasks import build_model

    spec = {**spec, **kw}
    task = {"name": spec.pop("task", "causal_lm")}
    task.update({k: spec.pop(k) for k in TASK_OPTIONS if k in spec})
    return build_model(spec, task)
