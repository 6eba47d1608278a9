"""dymu-kernels: fused kernels for DyMU (dynamic token merging and virtual token unmerging).

    import dymu_kernels as dk
    node_max, node_idx = dk.bipartite_similarity(metric, lengths, protect_first=True)
    row_map, new_lengths = dk.select_edges(node_max, node_idx, lengths, tau, N, protect_first=True)
    x, size = dk.scatter_merge(x, size, row_map, new_lengths)
    res = dk.dtome_merge(x, metric, size, lengths, tau, pos_map=pos_map, protect_first=True)
    tau = dk.batch_threshold(node_max, r)
    out = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths)
    out = dk.vtu_decode_attention(q, k_rows, v_rows, cos, sin, pos_map, q_positions)

Every op takes ``backend=None | "reference" | "native" | "triton"``; ``dk.backend_info()`` (or
``python -m dymu_kernels``) says which are available and why not.
"""

from ._alloc import INT_SENTINEL, poison_outputs
from ._backends import BackendUnavailable, backend_info
from .api import (
    batch_threshold,
    bipartite_similarity,
    dtome_merge,
    dtome_merge_varlen,
    proportional_attention_varlen,
    scatter_merge,
    select_edges,
    vtu_attention,
    vtu_decode_attention,
)
from .dtome.reference import DToMeResult
from .varlen.reference import DToMeVarlenResult

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "DToMeResult",
    "DToMeVarlenResult",
    "INT_SENTINEL",
    "backend_info",
    "batch_threshold",
    "bipartite_similarity",
    "dtome_merge",
    "dtome_merge_varlen",
    "proportional_attention_varlen",
    "poison_outputs",
    "scatter_merge",
    "select_edges",
    "vtu_attention",
    "vtu_decode_attention",
]
