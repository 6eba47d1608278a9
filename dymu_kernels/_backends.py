"""Which backends exist on this machine, and which one runs a call.

Backends: ``reference`` (pure PyTorch, always), ``native`` (the compiled ``dymu_kernels._C``),
``triton`` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests). Nothing here
fails at import: a missing backend is reported with the reason.

Selection for a call: the ``backend=`` argument, else the DYMU_BACKEND environment variable,
else the fastest backend that implements the op for the tensors' device
(CUDA: triton, native, reference; CPU: native, reference). An explicitly requested backend
that is unavailable or lacks the op raises; nothing falls back silently.
"""

import functools
import importlib
import os
import platform
from typing import Dict, Optional

import torch

BACKENDS = ("reference", "native", "triton")
FAMILIES = {
    "bipartite_similarity": "dtome",
    "select_edges": "dtome",
    "scatter_merge": "dtome",
    "dtome_merge": "dtome",
    "batch_threshold": "dtome",
    "vtu_attention": "vtu",
    "vtu_decode_attention": "vtu_decode",
    "dtome_merge_varlen": "varlen",
    "proportional_attention_varlen": "varlen",
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these tensors (the message says why)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _native_status() -> str:
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"unavailable: dymu_kernels._C is not built or failed to load ({exc}); install with `pip install --no-build-isolation -e .`"
    return "available"


@functools.lru_cache(maxsize=None)
def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"unavailable: triton is not installed ({exc})"
    if torch.cuda.is_available() or triton_interpreting():
        return "available"
    return "unavailable: no CUDA device (set TRITON_INTERPRET=1 before import to run kernels on CPU tensors for tests)"


def status(backend: str) -> str:
    if backend == "reference":
        return "available"
    if backend == "native":
        return _native_status()
    if backend == "triton":
        return _triton_status()
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


@functools.lru_cache(maxsize=None)
def module(backend: str, family: str):
    """The backend's module for an op family, e.g. ``dymu_kernels.dtome.native``."""
    name = "reference" if backend == "reference" else backend
    return importlib.import_module(f"dymu_kernels.{family}.{name}")


def implements(backend: str, op: str) -> bool:
    if not status(backend) == "available":
        return False
    try:
        return op in module(backend, FAMILIES[op]).SUPPORTED
    except (ImportError, RuntimeError):  # RuntimeError: a stale _C lacks the op's kernel (rebuild it)
        return False


def _supports_device(backend: str, device: torch.device) -> Optional[str]:
    """None if the backend can run on this device, else why not."""
    if backend == "reference" or device.type == "meta":
        return None
    if backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type}"
    if backend == "native":
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            from . import _C

            if _C.built_with_cuda():
                return None
            return "dymu_kernels._C was built without CUDA sources"
        return f"native has no kernels for {device.type} tensors"
    return f"unknown backend {backend!r}"


def select(op: str, device: torch.device, backend: Optional[str]) -> str:
    """Pick the backend that runs ``op`` on ``device`` (see the module docstring)."""
    requested = backend or os.environ.get("DYMU_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
        why = status(requested)
        if why != "available":
            raise BackendUnavailable(f"backend {requested!r} for {op}: {why}")
        if not implements(requested, op):
            raise BackendUnavailable(f"backend {requested!r} does not implement {op} yet")
        why = _supports_device(requested, device)
        if why is not None:
            raise BackendUnavailable(f"backend {requested!r} for {op}: {why}")
        return requested
    order = ("triton", "native", "reference") if device.type == "cuda" else ("native", "triton", "reference")
    for candidate in order:
        if candidate == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests; never the default on CPU
        if implements(candidate, op) and _supports_device(candidate, device) is None:
            return candidate
    return "reference"


def backend_info() -> Dict[str, str]:
    """{"reference": ..., "native": ..., "triton": ...}: "available" or the reason it is not."""
    return {name: status(name) for name in BACKENDS}


def describe() -> Dict[str, object]:
    """backend_info plus versions, devices and which ops each backend implements."""
    info: Dict[str, object] = {"backends": backend_info()}
    info["ops"] = {b: sorted(op for op in FAMILIES if implements(b, op)) for b in BACKENDS}
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    info["DYMU_BACKEND"] = os.environ.get("DYMU_BACKEND", "unset")
    info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["cpu"] = platform.processor() or platform.machine()
    if _native_status() == "available":
        from . import _C

        info["native_built_with_cuda"] = _C.built_with_cuda()
        info["native_openmp_threads"] = _C.openmp_max_threads()
    return info


def select_for_call(op: str, device: torch.device, backend: Optional[str]) -> str:
    """``select`` as the public wrappers call it: while torch.compile traces, the choice is made
    once at trace time and baked into the graph (DYMU_BACKEND is read then, not per call)."""
    if torch.compiler.is_compiling():
        return _select_constant(op, device.type, device.index, backend)
    return select(op, device, backend)


@torch.compiler.assume_constant_result
def _select_constant(op: str, device_type: str, device_index, backend):
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    return select(op, device, backend)
