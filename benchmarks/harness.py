"""Benchmark harness: device choice and helpers shared by the suites (not a conftest, so it
cannot shadow tests/conftest.py when both folders run in one pytest session).

Run: `make bench` (or `pytest benchmarks --benchmark-enable`). Each benchmark's `group` is the
shape label and `extra_info` holds {"impl", "op", "shape", "device", "peak_bytes"}; the
baselines are impl "official-eager" (DToMe) and "fast-path" (VTU). Compare implementations as
ratios within one run; never as absolute times across runs. `dymu bench` renders the report.
"""

import torch

from dymu_kernels._backends import implements

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def kernel_backends(op: str):
    """Backends worth timing on this machine (the Triton interpreter is never timed)."""
    names = ["reference"]
    if implements("native", op) and (DEVICE.type == "cpu" or _native_cuda()):
        names.append("native")
    if DEVICE.type == "cuda" and implements("triton", op):
        names.append("triton")
    return names


def _native_cuda() -> bool:
    from dymu_kernels import _C

    return _C.built_with_cuda()
