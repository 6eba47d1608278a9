"""Native (csrc/dtome_cpu.cpp, C++/OpenMP) backend of the dtome ops, for CPU tensors.

Each function has the reference's name and normalised signature (see ``reference.py``; the
arguments arrive validated from ``dymu_kernels.api``): it allocates the outputs with
``dymu_kernels._alloc.empty`` (poisoned in tests) and calls ``torch.ops.dymu.native_<op>``,
which writes into them. Fake kernels are registered here, so the ops run under
FakeTensorMode and torch.compile.

Notes:
- Inputs are made contiguous here (a strided input costs one copy).
- Decisions (node_idx, row_map, lengths) equal the reference's except for scores within
  rounding of the threshold or of a runner-up (the native dot products sum in another order).
- A row that keeps a single member is copied exactly (the reference computes x * s / s).
- Bit-identical run to run and for any thread count (no atomics; fixed summation order).
"""

from typing import Optional, Tuple

import torch

from .. import _alloc
from .reference import DToMeResult

try:
    from .. import _C  # noqa: F401  (loading the extension registers torch.ops.dymu.native_*)

    _LOADED = hasattr(torch.ops.dymu, "native_dtome_merge")
except ImportError:  # the backend reports itself unavailable (see _backends)
    _LOADED = False

SUPPORTED = (
    frozenset({"bipartite_similarity", "select_edges", "scatter_merge", "dtome_merge", "batch_threshold"})
    if _LOADED
    else frozenset()
)


def bipartite_similarity(
    metric: torch.Tensor, lengths: torch.Tensor, protect_first: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """metric [B, N, C] fp16/bf16/fp32, lengths [B] int32 -> node_max [B, ceil(N/2)] float32,
    node_idx [B, ceil(N/2)] int32 (see ``dk.bipartite_similarity``)."""
    bsz, n, _ = metric.shape
    node_max = _alloc.empty((bsz, (n + 1) // 2), torch.float32, metric.device)
    node_idx = _alloc.empty((bsz, (n + 1) // 2), torch.int32, metric.device)
    torch.ops.dymu.native_bipartite_similarity(
        metric.contiguous(), lengths.contiguous(), bool(protect_first), node_max, node_idx
    )
    return node_max, node_idx


def select_edges(
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    lengths: torch.Tensor,
    threshold: torch.Tensor,
    num_rows: int,
    protect_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """node_max [B, M] float32, node_idx [B, M] int32, lengths [B] int32, threshold [B] float32
    -> row_map [B, N] int32, new_lengths [B] int32 (see ``dk.select_edges``)."""
    bsz = node_max.shape[0]
    row_map = _alloc.empty((bsz, num_rows), torch.int32, node_max.device)
    new_lengths = _alloc.empty((bsz,), torch.int32, node_max.device)
    torch.ops.dymu.native_select_edges(
        node_max.contiguous(), node_idx.contiguous(), lengths.contiguous(), threshold.contiguous(),
        int(num_rows), bool(protect_first), row_map, new_lengths,
    )
    return row_map, new_lengths


def scatter_merge(
    x: torch.Tensor, size: torch.Tensor, row_map: torch.Tensor, new_lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, D] fp16/bf16/fp32, size [B, N] float32, row_map [B, N] int32, new_lengths [B]
    int32 -> x_out [B, N, D] x.dtype, size_out [B, N] float32 (see ``dk.scatter_merge``)."""
    x_out = _alloc.empty(x.shape, x.dtype, x.device)
    size_out = _alloc.empty(size.shape, torch.float32, x.device)
    torch.ops.dymu.native_scatter_merge(
        x.contiguous(), size.contiguous(), row_map.contiguous(), new_lengths.contiguous(), x_out, size_out
    )
    return x_out, size_out


def dtome_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    lengths: torch.Tensor,
    threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor],
    protect_first: bool,
) -> DToMeResult:
    """The fused merge step in one native call: x [B, N, D], metric [B, N, C], size [B, N]
    float32, lengths [B] int32, threshold [B] float32, pos_map [B, N0] int32 or None
    (see ``dk.dtome_merge``). Holds O(B * N * C) scratch, never an [N/2, N/2] score matrix."""
    bsz, n, _ = x.shape
    device = x.device
    x_out = _alloc.empty(x.shape, x.dtype, device)
    size_out = _alloc.empty((bsz, n), torch.float32, device)
    lengths_out = _alloc.empty((bsz,), torch.int32, device)
    row_map = _alloc.empty((bsz, n), torch.int32, device)
    pos_out = _alloc.empty(pos_map.shape, torch.int32, device) if pos_map is not None else None
    torch.ops.dymu.native_dtome_merge(
        x.contiguous(), metric.contiguous(), size.contiguous(), lengths.contiguous(), threshold.contiguous(),
        pos_map.contiguous() if pos_map is not None else None, bool(protect_first),
        x_out, size_out, lengths_out, row_map, pos_out,
    )
    return DToMeResult(x_out, size_out, lengths_out, pos_out, row_map)


def batch_threshold(node_max: torch.Tensor, r: int) -> torch.Tensor:
    """node_max [B, M] float32 -> 0-dim float32: the (B*r + 1)-th largest score (NaN counts as
    -inf: no edge), clamped at >= 0; 0 when there are fewer scores (linear-time
    selection, see ``dk.batch_threshold``)."""
    out = _alloc.empty((), torch.float32, node_max.device)
    torch.ops.dymu.native_batch_threshold(node_max.contiguous(), int(r), out)
    return out


# ------------------------------------------------------------------ fake kernels
# The ops only write into the outputs they are given: the fake kernels check nothing and
# return nothing (shapes and dtypes come from the allocations above).

if _LOADED:

    @torch.library.register_fake("dymu::native_bipartite_similarity")
    def _(metric, lengths, protect_first, node_max, node_idx):
        return None

    @torch.library.register_fake("dymu::native_select_edges")
    def _(node_max, node_idx, lengths, threshold, num_rows, protect_first, row_map, new_lengths):
        return None

    @torch.library.register_fake("dymu::native_scatter_merge")
    def _(x, size, row_map, new_lengths, x_out, size_out):
        return None

    @torch.library.register_fake("dymu::native_dtome_merge")
    def _(x, metric, size, lengths, threshold, pos_map, protect_first, x_out, size_out, lengths_out, row_map_out,
          pos_map_out):
        return None

    @torch.library.register_fake("dymu::native_batch_threshold")
    def _(node_max, r, out):
        return None
