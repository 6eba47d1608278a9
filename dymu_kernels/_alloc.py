"""Output allocation for the kernel backends, with optional poisoning.

Kernels write into buffers allocated here. With poisoning on, float buffers start as NaN and
integer buffers as ``INT_SENTINEL``, so a kernel that leaves a row unwritten fails loudly in
tests. Turn it on with ``DYMU_POISON_OUTPUTS=1`` or the ``poison_outputs()`` context manager.
"""

import contextlib
import os

import torch

INT_SENTINEL = -0x5EED  # -24301: not a valid row, length or index

_poison = os.environ.get("DYMU_POISON_OUTPUTS", "0") == "1"


def poisoning() -> bool:
    """Whether freshly allocated outputs are filled with NaN / INT_SENTINEL."""
    return _poison


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Context manager: poison every output buffer the kernels allocate inside it."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, poisoned when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else INT_SENTINEL)
    return out
