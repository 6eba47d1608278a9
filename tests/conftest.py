"""Test harness.

- Without a GPU, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton
  kernels run on CPU tensors (the interpreter has no bf16 dot and does bf16 arithmetic on raw
  bits: kernels upcast right after loading, and these tests run bf16 inputs through them).
- Every test runs with output poisoning on: the buffers kernels allocate start as NaN (floats)
  or INT_SENTINEL (integers), so an unwritten row fails loudly.
- Markers: gpu (skipped without CUDA), interpreter (Triton on CPU tensors), slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dymu_kernels as dk  # noqa: E402
from dymu_kernels._backends import implements, triton_interpreting  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poison_outputs():
    with dk.poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on: CUDA when present, else CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params(op: str):
    """pytest params of every backend, skipped with the reason where it cannot run ``op``."""
    params = []
    for name in ("reference", "native", "triton"):
        marks = []
        if name == "triton":
            marks.append(pytest.mark.interpreter)
            if not torch.cuda.is_available() and not triton_interpreting():
                marks.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET unset"))
        if not implements(name, op):
            marks.append(pytest.mark.skip(reason=f"{name} does not implement {op} ({dk.backend_info()[name]})"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params
