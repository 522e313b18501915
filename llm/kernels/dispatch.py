"""Choose a backend for each fused op, per call.

`backend="auto"` resolves in this order: a per-op override (`set_backend`, a
recipe's `kernels:` section, or the environment variable
``LLM_KERNELS="attention=triton,rms_norm=cuda"``), then the first backend in
`AUTO_ORDER` for the tensor's device that is installed and supports the call,
then torch, which always can. A backend asked for by name that cannot run (not
installed, wrong device, unsupported arguments) raises `BackendUnavailable`
naming the reason: a named backend is never silently swapped for another. For the
quantized linear ops, whose slower path costs much more, "auto" logs once per process
and reason why it passed a backend over.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm.errors import UserError
from llm.log import logger

QUANTIZED_OPS = ("int8_linear", "int4_linear", "int8_dynamic_linear")
OPS = ("attention", "layer_norm", "rms_norm", "linear_cross_entropy", *QUANTIZED_OPS)
BACKENDS = ("torch", "triton", "cuda", "cpu", "flash_attn", "apex")
ENV_VAR = "LLM_KERNELS"

# Preference for "auto" per device type; the first that is available and
# supports a call wins. On a CPU: the C kernels of the quantized linear ops, torch
# for the rest (Triton on a CPU needs the interpreter).
# The CUDA order is provisional until `llm bench kernels` has run on a GPU; load a
# measured one with `set_auto_order(auto_order_from_results(path))`.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {op: ("cpu", "torch") if op in QUANTIZED_OPS else ("torch",) for op in OPS},
    "cuda": {
        "attention": ("flash_attn", "torch", "triton"),
        "layer_norm": ("triton", "cuda", "apex", "torch"),
        "rms_norm": ("triton", "cuda", "apex", "torch"),
        "linear_cross_entropy": ("triton", "torch"),
        "int8_linear": ("triton", "torch"),
        "int4_linear": ("triton", "torch"),
        "int8_dynamic_linear": ("torch",),
    },
}


class BackendUnavailable(UserError, RuntimeError):
    """A backend was asked for by name (call, recipe or LLM_KERNELS) and cannot run this call."""


class UnknownKernelName(UserError, ValueError):
    """An op or backend name that does not exist (from a call, a recipe or LLM_KERNELS)."""


@dataclass
class Backend:
    """One implementation of an op.

    `load()` imports it lazily and returns the callable; `unavailable(device)`
    returns why it cannot run on that device type (None when it can);
    `unsupported(**call)` returns why it cannot take these arguments (None when it can).
    """

    load: Callable[[], Callable]
    unavailable: Callable[[str], str | None] = lambda device: None
    unsupported: Callable[..., str | None] = lambda **call: None
    _fn: Callable | None = field(default=None, repr=False)

    def fn(self) -> Callable:
        if self._fn is None:
            self._fn = self.load()
        return self._fn


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_OVERRIDES: dict[str, str] = {}
_ANNOUNCED: set[tuple[str, str, str]] = set()  # (op, backend, reason) already logged


def register(op: str, name: str, backend: Backend) -> None:
    if op not in OPS or name not in BACKENDS:
        raise ValueError(f"unknown op {op!r} or backend {name!r}")
    _REGISTRY[op][name] = backend


def _check_name(op: str, backend: str) -> None:
    if op not in OPS:
        raise UnknownKernelName(f"unknown kernel op {op!r}; ops are {', '.join(OPS)}")
    if backend != "auto" and backend not in BACKENDS:
        raise UnknownKernelName(f"unknown backend {backend!r} for {op}; choose auto or one of {', '.join(BACKENDS)}")


def set_backend(op: str, backend: str) -> None:
    """Make `backend` what "auto" means for `op` in this process ("auto" clears it)."""
    _check_name(op, backend)
    if backend == "auto":
        _OVERRIDES.pop(op, None)
    else:
        _OVERRIDES[op] = backend


def check_names(backends: dict[str, str]) -> None:
    """Raise UnknownKernelName for an unknown op or backend in a mapping such as {"attention": "triton"}."""
    for op, backend in backends.items():
        _check_name(op, backend)


@contextlib.contextmanager
def use(backends: dict[str, str]):
    """Within the block, "auto" means `backends[op]` for each op of a recipe's `kernels:` mapping;
    the previous choices come back afterwards."""
    check_names(backends)
    saved = dict(_OVERRIDES)
    try:
        for op, backend in backends.items():
            set_backend(op, backend)
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


@functools.lru_cache(maxsize=8)
def _parse_env(spec: str) -> dict[str, str]:
    result = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, backend = item.partition("=")
        if not sep:
            raise UnknownKernelName(f"{ENV_VAR}: expected op=backend items, got {item!r}")
        _check_name(op.strip(), backend.strip())
        result[op.strip()] = backend.strip()
    return result


def override(op: str) -> str | None:
    return _parse_env(os.environ.get(ENV_VAR, "").strip()).get(op) or _OVERRIDES.get(op)


def why_not(op: str, name: str, device: str, **call: Any) -> str | None:
    """Why backend `name` cannot run this call of `op` on `device` (None when it can)."""
    backend = _REGISTRY[op].get(name)
    if backend is None:
        return f"no {name} implementation of {op} exists"
    return backend.unavailable(device) or backend.unsupported(**call)


def resolve(op: str, backend: str, device: str, **call: Any) -> tuple[str, Callable]:
    """Return (name, function) of the backend that runs this call."""
    _check_name(op, backend)
    if backend == "auto":
        backend = override(op) or "auto"
    if backend != "auto":
        reason = why_not(op, backend, device, **call)
        if reason:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run here: {reason}")
        return backend, _REGISTRY[op][backend].fn()
    order = AUTO_ORDER.get(device, AUTO_ORDER["cpu"])[op]
    if order[0] == "torch":  # torch takes every call: nothing to check (a decode step makes hundreds of calls)
        return "torch", _REGISTRY[op]["torch"].fn()
    passed_over = []
    for name in order:
        reason = why_not(op, name, device, **call)
        if reason is None:
            break
        passed_over.append((name, reason))
    else:
        name = "torch"
    if op in QUANTIZED_OPS:
        _announce(op, passed_over, name)
    return name, _REGISTRY[op][name].fn()


def fallback_reason(op: str, device: str, **call: Any) -> str | None:
    """Why "auto" (without overrides) would run this call of `op` on torch: the reason of the first backend
    it passes over, or None when a faster one takes the call. A quantized layer checks its shape once with a
    stand-in input, e.g. `fallback_reason("int4_linear", "cpu", x=torch.empty(0, 4096), group_size=32)`,
    and names itself in its log line."""
    order = AUTO_ORDER.get(device, AUTO_ORDER["cpu"])[op]
    reasons = [why_not(op, name, device, **call) for name in order if name != "torch"]
    if not reasons:
        return f"{op} has no faster backend than torch on {device}"
    return None if None in reasons else reasons[0]


def _announce(op: str, passed_over: list[tuple[str, str]], chosen: str) -> None:
    """Log, once per process and reason, why "auto" did not take a faster backend."""
    for name, reason in passed_over:
        if (op, name, reason) not in _ANNOUNCED:
            _ANNOUNCED.add((op, name, reason))
            logger.warning(f"{op}: the {name} backend cannot run this call ({reason}); using {chosen}, which is slower")


def auto_order_from_results(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Per op, the backends of a `llm bench kernels` JSON ordered fastest first.

    Each backend is scored by the geometric mean of its time over torch's time on the
    rows (shape, dtype, pass) where both ran on a GPU; torch scores 1. Ops without GPU
    rows are left out, so the defaults stay for them.
    """
    with open(path) as f:
        rows = json.load(f)["rows"]
    times: dict[tuple, float] = {}
    for r in rows:
        if r.get("device") == "cuda" and r.get("time_ms") is not None:
            times[(r["op"], r["backend"], r["shape"], r["dtype"], r.get("pass", ""))] = r["time_ms"]
    scores: dict[str, dict[str, list[float]]] = {}
    for (op, backend, *config), t in times.items():
        base = times.get((op, "torch", *config))
        if base:
            scores.setdefault(op, {}).setdefault(backend, []).append(math.log(t / base))
    return {
        op: tuple(sorted(by_backend, key=lambda b: sum(by_backend[b]) / len(by_backend[b])))
        for op, by_backend in scores.items()
    }


def set_auto_order(order: dict[str, tuple[str, ...]], device: str = "cuda") -> None:
    """Replace what "auto" tries, in order, for the ops in `order` on `device`."""
    for op, backends in order.items():
        for name in backends:
            _check_name(op, name)
        AUTO_ORDER.setdefault(device, dict(AUTO_ORDER["cpu"]))[op] = tuple(backends)


def available_backends(op: str, device: str = "cpu") -> dict[str, str | None]:
    """Each known backend of `op` mapped to None (usable) or the reason it is not."""
    return {name: why_not(op, name, device) for name in BACKENDS}


def _triton_unavailable(device: str) -> str | None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a GPU, or TRITON_INTERPRET=1 on a CPU"
    if device not in ("cpu", "cuda"):
        return f"Triton does not run on {device}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _cuda_ext_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "the csrc/ CUDA kernels need a CUDA device"
    try:
        importlib.import_module("llm._C")
    except ImportError as e:
        return f"llm._C is not built ({e}); build with `pip install --no-build-isolation -e .` on a CUDA machine"
    return None


def _cpu_kernels_unavailable(op: str) -> Callable[[str], str | None]:
    """Why the cpu backend of `op` cannot run; the first call builds the C kernels (cpu_quant_linear.py)."""
    return lambda device: _imported("llm.kernels.cpu_quant_linear").unavailable(device, op)


def _package_unavailable(package: str, device: str) -> str | None:
    if device != "cuda":
        return f"{package} needs a CUDA device"
    try:
        found = importlib.util.find_spec(package) is not None
    except ImportError:  # a dotted name whose parent package is missing
        found = False
    return None if found else f"{package} is not installed"


# (op, backend) -> module implementing it; the module defines a function named
# like the op and, optionally, `<op>_unsupported(**call) -> reason | None`.
IMPLEMENTATIONS: dict[tuple[str, str], tuple[str, Callable[[str], str | None]]] = {
    **{(op, "torch"): ("llm.kernels.reference", lambda device: None) for op in OPS},
    ("attention", "triton"): ("llm.kernels.triton_attention", _triton_unavailable),
    ("layer_norm", "triton"): ("llm.kernels.triton_layer_norm", _triton_unavailable),
    ("rms_norm", "triton"): ("llm.kernels.triton_rms_norm", _triton_unavailable),
    ("linear_cross_entropy", "triton"): ("llm.kernels.triton_cross_entropy", _triton_unavailable),
    ("int8_linear", "triton"): ("llm.kernels.triton_quant_linear", _triton_unavailable),
    ("int4_linear", "triton"): ("llm.kernels.triton_quant_linear", _triton_unavailable),
    **{(op, "cpu"): ("llm.kernels.cpu_quant_linear", _cpu_kernels_unavailable(op)) for op in QUANTIZED_OPS},
    ("layer_norm", "cuda"): ("llm.kernels.cuda_norms", _cuda_ext_unavailable),
    ("rms_norm", "cuda"): ("llm.kernels.cuda_norms", _cuda_ext_unavailable),
    ("attention", "flash_attn"): ("llm.kernels.flash_attn_backend", lambda d: _package_unavailable("flash_attn", d)),
    # NVIDIA apex; the unrelated PyPI package named apex has no apex.normalization.
    ("layer_norm", "apex"): ("llm.kernels.apex_backend", lambda d: _package_unavailable("apex.normalization", d)),
    ("rms_norm", "apex"): ("llm.kernels.apex_backend", lambda d: _package_unavailable("apex.normalization", d)),
}


@functools.cache
def _imported(name: str):
    """importlib.import_module, remembered: the checks below run on every call of an op."""
    return importlib.import_module(name)


def _lazy(module: str, op: str, attr: str | None = None) -> Callable:
    def load():
        return getattr(_imported(module), attr or op)

    return load


def _lazy_check(module: str, op: str) -> Callable[..., str | None]:
    checker = functools.cache(lambda: getattr(_imported(module), f"{op}_unsupported", None))

    def check(**call):
        fn = checker()
        return fn(**call) if fn is not None else None

    return check


for (_op, _name), (_module, _unavailable) in IMPLEMENTATIONS.items():
    if importlib.util.find_spec(_module) is not None:
        register(
            _op,
            _name,
            Backend(load=_lazy(_module, _op), unavailable=_unavailable, unsupported=_lazy_check(_module, _op)),
        )
