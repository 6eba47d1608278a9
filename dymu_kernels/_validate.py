"""Argument checks shared by the public wrappers.

Shape, dtype and device checks always run (they read metadata only). Checks of tensor *values*
(lengths and maps in range, no NaN threshold) need the data on the host: they run for CPU
tensors always, and for GPU tensors only when validation is on (``validate=True`` or
DYMU_VALIDATE=1), since they would otherwise synchronise. Meta and fake tensors are never read,
and no value is read while torch.compile traces (``torch.compiler.is_compiling()``): a compiled
call runs the metadata checks only.
"""

import math
import numbers
import os
import warnings
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(t)


def values_checkable(t: torch.Tensor, validate: Optional[bool]) -> bool:
    """Whether value checks may read ``t`` (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False  # reading values would break the graph (and sync on GPU)
    if t.is_meta or _is_fake(t):
        return False
    if t.device.type == "cpu":
        return True
    if validate is None:
        return os.environ.get("DYMU_VALIDATE", "0") == "1"
    return bool(validate)


def tensor(name: str, t, ndim: int, dtypes: Sequence[torch.dtype], what: str) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` with one of ``dtypes``; ``what`` names its layout."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what} ({ndim}-D), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def same_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def dim_equals(name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must be {expected} ({meaning}), got shape {tuple(t.shape)}")


def lengths(
    name: str, t: Optional[torch.Tensor], batch: int, upper: int, device: torch.device, validate: Optional[bool]
) -> torch.Tensor:
    """int32 [B] lengths in [0, upper]; None means every row is valid."""
    if t is None:
        return torch.full((batch,), upper, dtype=torch.int32, device=device)
    tensor(name, t, 1, INDEX_DTYPES, "[B] integer lengths")
    dim_equals(name, t, 0, batch, "the batch size")
    same_device(device, **{name: t})
    if values_checkable(t, validate) and t.numel() and bool(((t < 0) | (t > upper)).any()):
        raise ValueError(f"{name} must lie in [0, {upper}], got values {t.min().item()}..{t.max().item()}")
    return t.to(torch.int32).contiguous()


def index_range(
    name: str, t: torch.Tensor, low: int, high: int, validate: Optional[bool], mask: Optional[torch.Tensor] = None
) -> None:
    """Values of ``t`` (where ``mask``) must lie in [low, high)."""
    if not values_checkable(t, validate) or t.numel() == 0:
        return
    bad = (t < low) | (t >= high)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must lie in [{low}, {high}), got {int(t[first])} at index {first}")


def threshold(value, batch: int, device: torch.device, validate: Optional[bool]) -> torch.Tensor:
    """A real number or a 0-dim / [B] float tensor -> float32 [B] on ``device``; NaN is an error.

    Numbers may be Python ints/floats, NumPy scalars or SymInt/SymFloat (under torch.compile).
    A tensor may live on any device (a 0-dim CPU tensor is the usual case, as PyTorch treats
    scalars): it is copied to ``device``. The NaN check reads the value: it is skipped while
    compiling, and for a GPU tensor unless validating.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"threshold tensor must be 0-dim or [B] with B = {batch}, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"threshold tensor must be floating point, got {value.dtype}")
        if values_checkable(value, validate) and bool(value.isnan().any()):
            raise ValueError("threshold must not be NaN (use +inf to merge nothing, -inf to merge every source)")
        return value.to(device=device, dtype=torch.float32).expand(batch).contiguous()
    if isinstance(value, (torch.SymInt, torch.SymFloat)) or torch.compiler.is_compiling():
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
            raise TypeError(f"threshold must be a real number or a 0-dim / [B] tensor, got {type(value).__name__}")
        return torch.full((batch,), value, dtype=torch.float32, device=device)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"threshold must be a real number or a 0-dim / [B] tensor, got {type(value).__name__}")
    value = float(value)  # NumPy scalars too
    if math.isnan(value):
        raise ValueError("threshold must not be NaN (use +inf to merge nothing, -inf to merge every source)")
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def flag(name: str, value) -> bool:
    """A bool argument (protect_first, causal): anything else is a TypeError (no truthy strings)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def count(name: str, value, low: int, high: int, meaning: str) -> int:
    """An int (not bool; SymInt under torch.compile) in [low, high]."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int in [{low}, {high}] ({meaning}), got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}] ({meaning}), got {value!r}")
    return int(value)


def positive_finite(name: str, value, meaning: str) -> float:
    """A real number > 0 and finite (e.g. the softmax scale); checked unless compiling."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)) or torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({meaning}), got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0 ({meaning}), got {value}")
    return value


_GRAD_WARNED = set()


def warn_if_grad(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """Warn once per op when an input requires grad under grad mode: the ops are inference-only
    (their outputs never carry a graph). Not checked while torch.compile traces."""
    if op in _GRAD_WARNED or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        _GRAD_WARNED.add(op)
        warnings.warn(
            f"dymu_kernels.{op} is inference-only: an input requires grad but the outputs carry no "
            "gradient; call it under torch.no_grad() or torch.inference_mode() (warned once per op)",
            UserWarning,
            stacklevel=3,
        )
