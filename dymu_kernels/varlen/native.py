"""Native (csrc/varlen_cpu.cpp, C++/OpenMP) backend of the packed varlen ops, for CPU tensors.

Each function has the reference's name and normalised signature (``reference.py``; arguments
arrive validated from ``dymu_kernels.api``), allocates the outputs with
``dymu_kernels._alloc.empty`` (poisoned in tests) and calls ``torch.ops.dymu.native_<op>``.
Fake kernels are registered here, so the ops run under FakeTensorMode and torch.compile.

Notes:
- The merge runs the padded native merge kernel image by image on contiguous views, so its
  decisions and values equal ``dk.dtome_merge(backend="native")`` bit for bit.
- The attention is per image: two batched fp32 GEMMs (CPU BLAS) around an fp32 softmax with the
  log-size row broadcast; never a [T, T] matrix, and work n^2 per image of n rows.
- Inputs are made contiguous here (a strided input costs one copy). Bit-identical run to run.
"""

from typing import Optional

import torch

from .. import _alloc
from .reference import DToMeVarlenResult

try:
    from .. import _C  # noqa: F401  (loading the extension registers torch.ops.dymu.native_*)

    _LOADED = hasattr(torch.ops.dymu, "native_dtome_merge_varlen")
except ImportError:
    _LOADED = False

SUPPORTED = frozenset({"dtome_merge_varlen", "proportional_attention_varlen"}) if _LOADED else frozenset()


def dtome_merge_varlen(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor],
    protect_first: bool,
    max_seqlen: int = 0,
) -> DToMeVarlenResult:
    """(max_seqlen is not needed here) x [T, D] fp16/bf16/fp32, metric [T, C], size [T] float32, cu_seqlens [B + 1] int32,
    threshold [B] float32, pos_map (any shape) int32 or None (see ``dk.dtome_merge_varlen``)."""
    num_rows = x.shape[0]
    device = x.device
    x_out = _alloc.empty(x.shape, x.dtype, device)
    size_out = _alloc.empty((num_rows,), torch.float32, device)
    cu_out = _alloc.empty(cu_seqlens.shape, torch.int32, device)
    row_map = _alloc.empty((num_rows,), torch.int32, device)
    pos_out = _alloc.empty(pos_map.shape, torch.int32, device) if pos_map is not None else None
    torch.ops.dymu.native_dtome_merge_varlen(
        x.contiguous(), metric.contiguous(), size.contiguous(), cu_seqlens.contiguous(), threshold.contiguous(),
        pos_map.contiguous() if pos_map is not None else None, bool(protect_first),
        x_out, size_out, cu_out, row_map, pos_out,
    )
    return DToMeVarlenResult(x_out, size_out, cu_out, pos_out, row_map)


def proportional_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    max_seqlen: int = 0,
) -> torch.Tensor:
    """q, k, v [T, H, D] one float dtype, size [T] float32, cu_seqlens [B + 1] int32 -> out [T, H, D]
    in q.dtype (see ``dk.proportional_attention_varlen``; max_seqlen is not needed here)."""
    out = _alloc.empty(q.shape, q.dtype, q.device)
    torch.ops.dymu.native_proportional_attention_varlen(
        q.contiguous(), k.contiguous(), v.contiguous(), size.contiguous(), cu_seqlens.contiguous(), float(scale), out
    )
    return out


if _LOADED:

    @torch.library.register_fake("dymu::native_dtome_merge_varlen")
    def _(x, metric, size, cu_seqlens, threshold, pos_map, protect_first, x_out, size_out, cu_out, row_map_out,
          pos_map_out):
        return None

    @torch.library.register_fake("dymu::native_proportional_attention_varlen")
    def _(q, k, v, size, cu_seqlens, scale, out):
        return None
