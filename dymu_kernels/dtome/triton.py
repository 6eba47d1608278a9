"""Triton backend of the dtome ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Every function here takes the same normalised arguments as the reference function of the same
name (``dymu_kernels.dtome.reference``; lengths int32 [B], thresholds float32 [B]) and has its
exact semantics: row_map / lengths / node_idx are bit-identical to the reference away from
near-ties (scores within rounding of tau or of a runner-up). The kernels are in
``triton_kernels.py``; each op is a ``torch.library`` custom op (``dymu::triton_*``) with a fake
kernel, so it runs under FakeTensorMode and torch.compile.

Launches: bipartite_similarity 1, select_edges 1, scatter_merge 1, dtome_merge 3
(similarity, selection, merge + pos_map). batch_threshold is torch.topk on the device (no
host sync; not a Triton kernel). No op synchronises with the host; no atomics at all, so every
output is bit-identical run to run.

Limitations: metric dim C <= 128 (padded to a power of two >= 16 inside); see the notes at the
top of ``triton_kernels.py`` for the cost model of the merge kernel.
"""

from typing import Optional, Tuple

import torch
import triton

from .. import _alloc
from .._backends import triton_interpreting
from .reference import DToMeResult
from .triton_kernels import merge_kernel, select_kernel, similarity_kernel

SUPPORTED = frozenset(
    {"bipartite_similarity", "select_edges", "scatter_merge", "dtome_merge", "batch_threshold"}
)


# ----------------------------------------------------------------------------- launch configs


def _similarity_config(n: int, c: int) -> dict:
    """Block sizes / warps of the similarity kernel (tl.dot needs every dim >= 16).

    C is walked in chunks of BLOCK_K = 16 whatever its size, so c does not pick a variant.
    """
    block_a = max(16, min(64, triton.next_power_of_2((n + 1) // 2)))
    block_b = max(16, min(64, triton.next_power_of_2(max(n // 2, 1))))
    # 64 x 64 fp32 tiles with 4 warps need 255 registers and spill (fp32 metric); 8 warps do not.
    num_warps = 8 if block_a * block_b >= 64 * 64 else 4
    return dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=16, num_warps=num_warps)


def _select_config(n: int) -> dict:
    block = max(16, min(1024, triton.next_power_of_2((n + 1) // 2)))
    return dict(BLOCK=block, num_warps=4 if block <= 512 else 8)


def _merge_config(n: int, d: int) -> dict:
    """BLOCK_R output rows x BLOCK_D features per program (about 4096 fp32 accumulators)."""
    block_d = max(16, min(2048, triton.next_power_of_2(max(d, 1))))
    block_r = max(1, min(16, 4096 // block_d))
    block_i = max(16, min(256, triton.next_power_of_2(n)))
    num_warps = 4 if block_r * block_d <= 2048 else 8
    return dict(BLOCK_R=block_r, BLOCK_I=block_i, BLOCK_D=block_d, BLOCK_P=16, num_warps=num_warps)


# ----------------------------------------------------------------------------- launchers


def _launch_similarity(metric, lengths, protect_first):
    bsz, n, c = metric.shape
    num_src = (n + 1) // 2
    node_max = _alloc.empty((bsz, num_src), torch.float32, metric.device)
    node_idx = _alloc.empty((bsz, num_src), torch.int32, metric.device)
    if bsz == 0:
        return node_max, node_idx
    cfg = _similarity_config(n, c)
    grid = (triton.cdiv(num_src, cfg["BLOCK_A"]), bsz)
    similarity_kernel[grid](
        metric, lengths.contiguous(), node_max, node_idx, n, c, *metric.stride(), PROTECT_FIRST=protect_first, **cfg
    )
    return node_max, node_idx


def _launch_select(node_max, node_idx, lengths, threshold, num_rows, protect_first):
    bsz = node_max.shape[0]
    row_map = _alloc.empty((bsz, num_rows), torch.int32, node_max.device)
    new_lengths = _alloc.empty((bsz,), torch.int32, node_max.device)
    if bsz == 0:
        return row_map, new_lengths
    select_kernel[(bsz,)](
        node_max.contiguous(), node_idx.contiguous(), lengths.contiguous(), threshold.contiguous(),
        row_map, new_lengths, num_rows, PROTECT_FIRST=protect_first, **_select_config(num_rows),
    )
    return row_map, new_lengths


def _launch_merge(x, size, row_map, pos_map):
    bsz, n, d = x.shape
    x_out = _alloc.empty((bsz, n, d), x.dtype, x.device)
    size_out = _alloc.empty((bsz, n), torch.float32, x.device)
    has_pos = pos_map is not None
    n0 = pos_map.shape[1] if has_pos else 0
    pos_out = _alloc.empty((bsz, n0), torch.int32, x.device)
    if bsz == 0:
        return x_out, size_out, pos_out
    cfg = _merge_config(n, d)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), bsz, max(1, triton.cdiv(d, cfg["BLOCK_D"])))
    pos_in = pos_map.contiguous() if has_pos else row_map  # a dummy pointer when absent
    merge_kernel[grid](
        x, size.contiguous(), row_map.contiguous(), x_out, size_out, pos_in, pos_out,
        n, d, n0, *x.stride(), HAS_POS_MAP=has_pos,
        BF16_BY_BITS=x.dtype == torch.bfloat16 and triton_interpreting(), **cfg,
    )
    return x_out, size_out, pos_out


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("dymu::triton_bipartite_similarity", mutates_args=())
def _similarity_op(metric: torch.Tensor, lengths: torch.Tensor, protect_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_similarity(metric, lengths, protect_first)


@_similarity_op.register_fake
def _(metric, lengths, protect_first):
    bsz, n, _ = metric.shape
    shape = (bsz, (n + 1) // 2)
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("dymu::triton_select_edges", mutates_args=())
def _select_op(
    node_max: torch.Tensor, node_idx: torch.Tensor, lengths: torch.Tensor, threshold: torch.Tensor,
    num_rows: int, protect_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_select(node_max, node_idx, lengths, threshold, num_rows, protect_first)


@_select_op.register_fake
def _(node_max, node_idx, lengths, threshold, num_rows, protect_first):
    bsz = node_max.shape[0]
    return node_max.new_empty((bsz, num_rows), dtype=torch.int32), node_max.new_empty((bsz,), dtype=torch.int32)


@torch.library.custom_op("dymu::triton_scatter_merge", mutates_args=())
def _scatter_merge_op(x: torch.Tensor, size: torch.Tensor, row_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x_out, size_out, _ = _launch_merge(x, size, row_map, None)
    return x_out, size_out


@_scatter_merge_op.register_fake
def _(x, size, row_map):
    bsz, n, _ = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((bsz, n), dtype=torch.float32)


@torch.library.custom_op("dymu::triton_dtome_merge", mutates_args=())
def _dtome_merge_op(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, lengths: torch.Tensor, threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor], protect_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    node_max, node_idx = _launch_similarity(metric, lengths, protect_first)
    row_map, new_lengths = _launch_select(node_max, node_idx, lengths, threshold, x.shape[1], protect_first)
    x_out, size_out, pos_out = _launch_merge(x, size, row_map, pos_map)
    return x_out, size_out, new_lengths, pos_out, row_map


@_dtome_merge_op.register_fake
def _(x, metric, size, lengths, threshold, pos_map, protect_first):
    bsz, n, _ = x.shape
    n0 = pos_map.shape[1] if pos_map is not None else 0
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((bsz, n), dtype=torch.float32),
        x.new_empty((bsz,), dtype=torch.int32),
        x.new_empty((bsz, n0), dtype=torch.int32),
        x.new_empty((bsz, n), dtype=torch.int32),
    )


@torch.library.custom_op("dymu::triton_batch_threshold", mutates_args=())
def _batch_threshold_op(node_max: torch.Tensor, r: int) -> torch.Tensor:
    flat = node_max.reshape(-1).float()
    k = node_max.shape[0] * r + 1
    if k > flat.numel():  # a shape test, not a data read
        return torch.zeros((), dtype=torch.float32, device=node_max.device)
    return torch.topk(flat, k, sorted=True).values[k - 1].clamp_min(0.0).clone()


@_batch_threshold_op.register_fake
def _(node_max, r):
    return node_max.new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------- public backend API


def bipartite_similarity(metric: torch.Tensor, lengths: torch.Tensor, protect_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best destination of every source; see ``dk.bipartite_similarity``.

    metric [B, N, C] fp16/bf16/fp32 (any strides, C <= 128), lengths [B] int32.
    Returns node_max [B, ceil(N/2)] float32 and node_idx [B, ceil(N/2)] int32.
    """
    return _similarity_op(metric, lengths, bool(protect_first))


def select_edges(
    node_max: torch.Tensor, node_idx: torch.Tensor, lengths: torch.Tensor, threshold: torch.Tensor,
    num_rows: int, protect_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Strict threshold test, cap rule and new order; see ``dk.select_edges``.

    node_max [B, ceil(N/2)] float32, node_idx same shape int32, lengths [B] int32,
    threshold [B] float32, num_rows N. Returns row_map [B, N] int32 and new_lengths [B] int32.
    """
    return _select_op(node_max, node_idx, lengths, threshold, int(num_rows), bool(protect_first))


def scatter_merge(
    x: torch.Tensor, size: torch.Tensor, row_map: torch.Tensor, new_lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge into row_map's rows, fp32 accumulation; see ``dk.scatter_merge``.

    x [B, N, D] fp16/bf16/fp32 (any strides), size [B, N] float32, row_map [B, N] int32.
    Returns x_out [B, N, D] x.dtype (contiguous) and size_out [B, N] float32. new_lengths is not
    read: rows that nothing maps to (rows >= new_lengths for a valid map) come out zero.
    """
    return _scatter_merge_op(x, size, row_map)


def dtome_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, lengths: torch.Tensor, threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor], protect_first: bool,
) -> DToMeResult:
    """One DToMe step in three launches; see ``dk.dtome_merge``.

    x [B, N, D], metric [B, N, C] (any strides), size [B, N] float32, lengths [B] int32,
    threshold [B] float32, pos_map [B, N0] int32 or None. Returns DToMeResult.
    """
    x_out, size_out, new_lengths, pos_out, row_map = _dtome_merge_op(
        x, metric, size, lengths, threshold, pos_map, bool(protect_first)
    )
    return DToMeResult(x_out, size_out, new_lengths, pos_out if pos_map is not None else None, row_map)


def batch_threshold(node_max: torch.Tensor, r: int) -> torch.Tensor:
    """(B*r + 1)-th largest node_max of the batch, clamped at >= 0; 0-dim float32 (torch.topk)."""
    return _batch_threshold_op(node_max, int(r))


# ----------------------------------------------------------------------------- compile specs
# The kernels with the block sizes and warps their launchers pick for CLIP ViT-L/14-336
# (N = 577 tokens, metric C = 64, features D = 1024), fp16 activations.

_CLIP_N, _CLIP_C, _CLIP_D = 577, 64, 1024


def _spec(name, kernel, signature, cfg, **constexprs):
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    constexprs.update(cfg)
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    return dict(name=name, kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps)


COMPILE_SPECS = [
    _spec(
        f"dtome.similarity[{dtype}, protect={protect}]",
        similarity_kernel,
        {"metric_ptr": f"*{dtype}", "lengths_ptr": "*i32", "node_max_ptr": "*fp32", "node_idx_ptr": "*i32",
         "N": "i32", "C": "i32", "stride_mb": "i32", "stride_mn": "i32", "stride_mc": "i32"},
        _similarity_config(_CLIP_N, _CLIP_C),
        PROTECT_FIRST=protect,
    )
    for dtype, protect in (("fp16", False), ("fp16", True), ("bf16", True), ("fp32", True))
] + [
    _spec(
        "dtome.select",
        select_kernel,
        {"node_max_ptr": "*fp32", "node_idx_ptr": "*i32", "lengths_ptr": "*i32", "tau_ptr": "*fp32",
         "row_map_ptr": "*i32", "new_lengths_ptr": "*i32", "N": "i32"},
        _select_config(_CLIP_N),
        PROTECT_FIRST=True,
    ),
] + [
    _spec(
        f"dtome.merge[{dtype}, pos_map={has_pos}]",
        merge_kernel,
        {"x_ptr": f"*{dtype}", "size_ptr": "*fp32", "row_map_ptr": "*i32", "x_out_ptr": f"*{dtype}",
         "size_out_ptr": "*fp32", "pos_map_ptr": "*i32", "pos_out_ptr": "*i32", "N": "i32", "D": "i32",
         "N0": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xd": "i32"},
        _merge_config(_CLIP_N, _CLIP_D),
        HAS_POS_MAP=has_pos,
        BF16_BY_BITS=False,
    )
    for dtype, has_pos in (("fp16", False), ("fp16", True), ("bf16", True), ("fp32", True))
]
