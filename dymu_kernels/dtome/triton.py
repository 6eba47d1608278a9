"""Triton backend of the dtome ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Every function here takes the same normalised arguments as the reference function of the same
name (``dymu_kernels.dtome.reference``; lengths int32 [B], thresholds float32 [B]) and has its
exact semantics: row_map / lengths / node_idx are bit-identical to the reference away from
near-ties (scores within rounding of tau or of a runner-up). The kernels are in
``triton_kernels.py``; each op is a ``torch.library`` custom op (``dymu::triton_*``) with a fake
kernel, so it runs under FakeTensorMode and torch.compile.

Launches: bipartite_similarity 1 (2 when the destinations are split over programs: small
grids), select_edges 1, scatter_merge 2 (grouping, merge), dtome_merge 4 or 5 (similarity
[+ combine], selection, grouping, merge + pos_map). Every launch runs under
``torch.cuda.device(tensor.device)``, so tensors on another GPU than the current one launch
there, on that device's current stream. batch_threshold is torch.topk on the device (no host
sync; not a Triton kernel; a NaN score counts as -inf there). No op
synchronises with the host; no atomics at all, so every output is bit-identical run to run.
Unvalidated lengths outside [0, N] act as clamped to [0, N].

The same kernels have a PACKED mode (the packed layout of ``dk.dtome_merge_varlen``, launched by
``dymu_kernels.varlen.triton``); ``kernel_specs(packed=True)`` lists its compile specs.

Limitations: metric dim C <= 128 (padded to a power of two >= 16 inside); see the notes at the
top of ``triton_kernels.py`` for the cost model of the merge kernel.
"""

import contextlib
from typing import Optional, Tuple

import torch
import triton

from .. import _alloc
from .._backends import triton_interpreting
from .reference import DToMeResult
from .triton_kernels import (
    group_rows_kernel, merge_kernel, select_kernel, similarity_combine_kernel, similarity_kernel,
)

SUPPORTED = frozenset(
    {"bipartite_similarity", "select_edges", "scatter_merge", "dtome_merge", "batch_threshold"}
)


# ----------------------------------------------------------------------------- launch configs

# Programs the similarity grid aims for: enough to fill an H100/H200 (132 SMs) about twice.
_TARGET_PROGRAMS = 264


def _similarity_config(n: int, c: int, bsz: int = 1, dtype: torch.dtype = torch.float16) -> dict:
    """Block sizes / warps / destination splits of the similarity kernel (tl.dot needs dims >= 16).

    C is walked in chunks of BLOCK_K = 16 whatever its size, so c does not pick a variant. When
    B * source tiles is small (B = 1, N = 577: 10 tiles), the destinations are split over
    ``splits`` programs per tile as well, each writing its best edge to a scratch row that a
    second small kernel reduces in split order (the same decisions as one program).
    """
    if dtype == torch.float32:
        # fp32 tiles of 32 x 64 spill 8-32 B of stack on sm_90 at 4 or 8 warps, pipelined or not
        # (measured with the runtime specialisation); 16 x 32 with 8 warps and no pipelining has
        # 40-48 registers and no spill on sm_80 / sm_90 for C = 64 and C = 72.
        cap_a, cap_b, num_warps, num_stages = 16, 32, 8, 1
    else:
        cap_a, cap_b, num_warps, num_stages = 32, 64, 4, 3
    block_a = max(16, min(cap_a, triton.next_power_of_2((n + 1) // 2)))
    block_b = max(16, min(cap_b, triton.next_power_of_2(max(n // 2, 1))))
    tiles = triton.cdiv((n + 1) // 2, block_a)
    dst_blocks = max(1, triton.cdiv(n // 2, block_b))
    splits = max(1, min(dst_blocks, triton.cdiv(_TARGET_PROGRAMS, max(1, bsz * tiles))))
    dst_per_split = triton.cdiv(dst_blocks, splits) * block_b
    splits = max(1, triton.cdiv(max(n // 2, 1), dst_per_split))
    return dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=16, num_warps=num_warps, num_stages=num_stages,
                splits=splits, dst_per_split=dst_per_split)


def _select_config(n: int) -> dict:
    block = max(16, min(1024, triton.next_power_of_2((n + 1) // 2)))
    return dict(BLOCK=block, num_warps=4 if block <= 512 else 8)


def _group_config(n: int) -> dict:
    block = max(16, min(64, triton.next_power_of_2(n)))
    return dict(BLOCK_I=block, BLOCK_J=block, num_warps=4)


def _merge_config(n: int, d: int, interpreter: bool = False) -> dict:
    """BLOCK_R output rows per program, walked CHUNK positions x BLOCK_D features per step.

    BLOCK_D is 64 or 32, whichever pads D less (ties -> 64), capped at D's power of two; the grid
    covers D. CHUNK = 64 positions of ``order`` per step whatever the rows' source counts; a
    program owning BLOCK_R = 32 rows of a typical step (about half the rows merge) finishes in
    one or two steps, and one owning a row with hundreds of sources (a flat image) in a few more.
    8 warps: at 4 the [64, 64] scan spills 8 B of stack on sm_80. Under the interpreter (whose
    scan is an element-by-element Python loop) CHUNK = 16, which also puts chunk boundaries
    inside the tests' small rows.
    """
    d = max(d, 1)
    block_d = min((64, 32), key=lambda blk: (triton.cdiv(d, blk) * blk - d, -blk))
    block_d = min(block_d, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_R=32, CHUNK=16 if interpreter else 64, BLOCK_D=block_d, BLOCK_P=16, num_warps=8)


# ----------------------------------------------------------------------------- launchers


def _device_guard(device: torch.device):
    """Launch on the tensors' device (and its current stream), not the current one: with
    tensors on cuda:1 (HF device_map="auto") Triton would otherwise use cuda:0's stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_similarity(metric, lengths, protect_first):
    bsz, n, c = metric.shape
    num_src = (n + 1) // 2
    node_max = _alloc.empty((bsz, num_src), torch.float32, metric.device)
    node_idx = _alloc.empty((bsz, num_src), torch.int32, metric.device)
    if bsz == 0:
        return node_max, node_idx
    cfg = _similarity_config(n, c, bsz, metric.dtype)
    splits, dst_per_split = cfg.pop("splits"), cfg.pop("dst_per_split")
    if splits > 1:
        part_max = torch.empty((splits, bsz, num_src), dtype=torch.float32, device=metric.device)
        part_idx = torch.empty((splits, bsz, num_src), dtype=torch.int32, device=metric.device)
    else:
        part_max, part_idx = node_max, node_idx
    grid = (triton.cdiv(num_src, cfg["BLOCK_A"]), splits, bsz)
    with _device_guard(metric.device):
        similarity_kernel[grid](
            metric, lengths.contiguous(), part_max, part_idx, n, c, *metric.stride(), dst_per_split,
            PROTECT_FIRST=protect_first, PACKED=False, **cfg,
        )
        if splits > 1:
            total = bsz * num_src
            similarity_combine_kernel[(triton.cdiv(total, 1024),)](
                part_max, part_idx, node_max, node_idx, total, splits, BLOCK=1024, num_warps=4
            )
    return node_max, node_idx


def _launch_select(node_max, node_idx, lengths, threshold, num_rows, protect_first):
    bsz = node_max.shape[0]
    row_map = _alloc.empty((bsz, num_rows), torch.int32, node_max.device)
    new_lengths = _alloc.empty((bsz,), torch.int32, node_max.device)
    if bsz == 0:
        return row_map, new_lengths
    with _device_guard(node_max.device):
        select_kernel[(bsz,)](
            node_max.contiguous(), node_idx.contiguous(), lengths.contiguous(), threshold.contiguous(),
            row_map, new_lengths, num_rows, PROTECT_FIRST=protect_first, PACKED=False,
            **_select_config(num_rows),
        )
    return row_map, new_lengths


def _launch_merge(x, size, row_map, pos_map):
    bsz, n, d = x.shape
    x_out = _alloc.empty((bsz, n, d), x.dtype, x.device)
    size_out = _alloc.empty((bsz, n), torch.float32, x.device)
    has_pos = pos_map is not None
    n0 = pos_map.shape[1] if has_pos else 0
    pos_out = _alloc.empty((bsz, n0), torch.int32, x.device)
    if bsz == 0 or n == 0:
        if n == 0:
            pos_out.fill_(-1)
        return x_out, size_out, pos_out
    row_map = row_map.contiguous()
    order = torch.empty((bsz, n), dtype=torch.int32, device=x.device)
    key = torch.empty((bsz, n), dtype=torch.int32, device=x.device)
    start = torch.empty((bsz, n), dtype=torch.int32, device=x.device)
    count = torch.empty((bsz, n), dtype=torch.int32, device=x.device)
    gcfg = _group_config(n)
    cfg = _merge_config(n, d, triton_interpreting())
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), bsz, max(1, triton.cdiv(d, cfg["BLOCK_D"])))
    pos_in = pos_map.contiguous() if has_pos else row_map  # a dummy pointer when absent
    with _device_guard(x.device):
        group_rows_kernel[(triton.cdiv(n, gcfg["BLOCK_I"]), bsz)](
            row_map, order, key, start, count, row_map, row_map, row_map, n, 0, PACKED=False, **gcfg
        )  # (cu / new_cu / packed map: unused dummies)
        merge_kernel[grid](
            x, size.contiguous(), order, key, start, count, row_map, x_out, size_out, pos_in, pos_out,
            row_map, row_map, n, d, n0, 0, *x.stride(), HAS_POS_MAP=has_pos, PACKED=False,
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
    flat = torch.where(flat.isnan(), float("-inf"), flat)  # NaN rule: a NaN score counts as -inf
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
# The kernels with the block sizes and warps their launchers pick, specialised as the runtime
# specialises them (``dymu_kernels.compile_check``): pointers from torch allocations are
# 16-aligned, contiguous inputs have a last stride of 1 (a constexpr at run time) and, where
# the model's width is a multiple of 16, row and batch strides divisible by 16. Shapes:
# CLIP ViT-L/14-336 (N = 577, metric C = 64, D = 1024, CLS) and SigLIP SO400M (N = 729, C = 72,
# D = 1152: strides not divisible by 16, so no vector hint on the metric); every activation
# dtype the ops and the model layer accept (the three kernels read one dtype each, so mixed
# x / metric dtypes are covered too); plus one variant per kernel with no specialisation at all
# (arbitrary strides, e.g. keys sliced out of a fused qkv).

_SHAPES = {"CLIP": (577, 64, 1024, True), "SigLIP": (729, 72, 1152, False)}
_DTYPES = ("fp16", "bf16", "fp32")
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _spec(name, kernel, signature, cfg, specialize=None, vectorized_loads=False, **constexprs):
    cfg = {k: v for k, v in cfg.items() if k not in ("splits", "dst_per_split")}
    num_warps = cfg.pop("num_warps")
    num_stages = cfg.pop("num_stages", 3)
    constexprs.update(cfg)
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    spec = dict(name=name, kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages)
    if specialize:
        spec["specialize"] = specialize
    if vectorized_loads:
        spec["vectorized_loads"] = True
    return spec


def _pointers(signature):
    return [k for k, v in signature.items() if v.startswith("*")]


def kernel_specs(packed: bool = False):
    """COMPILE_SPECS of the five kernels; ``packed``: their PACKED variants, the ones the Triton
    ``dtome_merge_varlen`` launches (``dymu_kernels.varlen.triton``), named ``varlen.dtome_*``.
    Packed shapes: image rows bounded by W = N of the model, x / metric [T, D] / [T, C] (batch
    stride 0, row stride D / C)."""
    specs = []
    prefix = "varlen.dtome_" if packed else "dtome."
    for dtype in _DTYPES:
        sig = {"metric_ptr": f"*{dtype}", "lengths_ptr": "*i32", "node_max_ptr": "*fp32", "node_idx_ptr": "*i32",
               "N": "i32", "C": "i32", "stride_mb": "i32", "stride_mn": "i32", "stride_mc": "i32",
               "dst_per_split": "i32"}
        for shape, (n, c, _, protect) in _SHAPES.items():
            aligned = c % 16 == 0
            specialize = {"divisible_by_16": _pointers(sig) + (["C", "stride_mb", "stride_mn"] if aligned else []),
                          "equal_to_1": ["stride_mc"]}
            if packed and not aligned:
                specialize["divisible_by_16"].append("stride_mb")  # 0 in the packed launch
            specs.append(_spec(f"{prefix}similarity[{shape} {dtype}, runtime]", similarity_kernel, sig,
                               _similarity_config(n, c, dtype=_TORCH[dtype]), specialize, vectorized_loads=aligned,
                               PROTECT_FIRST=protect, PACKED=packed))
        specs.append(_spec(f"{prefix}similarity[{dtype}, any strides]", similarity_kernel, sig,
                           _similarity_config(577, 64, dtype=_TORCH[dtype]), PROTECT_FIRST=False, PACKED=packed))
    if not packed:  # the combine kernel has no packed variant (its scratch is [S, B, ceil(W/2)] either way)
        sig = {"part_max_ptr": "*fp32", "part_idx_ptr": "*i32", "node_max_ptr": "*fp32", "node_idx_ptr": "*i32",
               "total": "i32", "num_splits": "i32"}
        specs.append(_spec("dtome.similarity_combine", similarity_combine_kernel, sig, dict(BLOCK=1024, num_warps=4),
                           {"divisible_by_16": _pointers(sig)}))
    sig = {"node_max_ptr": "*fp32", "node_idx_ptr": "*i32", "lengths_ptr": "*i32", "tau_ptr": "*fp32",
           "row_map_ptr": "*i32", "new_lengths_ptr": "*i32", "N": "i32"}
    for shape, (n, _, _, protect) in _SHAPES.items():
        specs.append(_spec(f"{prefix}select[{shape}]", select_kernel, sig, _select_config(n),
                           {"divisible_by_16": _pointers(sig)}, PROTECT_FIRST=protect, PACKED=packed))
    sig = {"row_map_ptr": "*i32", "order_ptr": "*i32", "key_ptr": "*i32", "start_ptr": "*i32", "count_ptr": "*i32",
           "cu_ptr": "*i32", "new_cu_ptr": "*i32", "packed_map_ptr": "*i32", "N": "i32", "T": "i32"}
    for shape, (n, _, _, _) in _SHAPES.items():
        specs.append(_spec(f"{prefix}group_rows[{shape}]", group_rows_kernel, sig, _group_config(n),
                           {"divisible_by_16": _pointers(sig)}, PACKED=packed))
    for dtype in _DTYPES:
        sig = {"x_ptr": f"*{dtype}", "size_ptr": "*fp32", "order_ptr": "*i32", "key_ptr": "*i32", "start_ptr": "*i32",
               "count_ptr": "*i32", "row_map_ptr": "*i32", "x_out_ptr": f"*{dtype}", "size_out_ptr": "*fp32",
               "pos_map_ptr": "*i32", "pos_out_ptr": "*i32", "cu_ptr": "*i32", "new_cu_ptr": "*i32",
               "N": "i32", "D": "i32", "N0": "i32", "T": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xd": "i32"}
        specialize = {"divisible_by_16": _pointers(sig) + ["D", "stride_xb", "stride_xn"], "equal_to_1": ["stride_xd"]}
        for shape, (n, _, d, _) in _SHAPES.items():
            for has_pos in (False, True):
                specs.append(_spec(f"{prefix}merge[{shape} {dtype}, pos_map={has_pos}, runtime]", merge_kernel, sig,
                                   _merge_config(n, d), specialize, vectorized_loads=True,
                                   HAS_POS_MAP=has_pos, PACKED=packed, BF16_BY_BITS=False))
        specs.append(_spec(f"{prefix}merge[{dtype}, pos_map=True, any strides]", merge_kernel, sig,
                           _merge_config(577, 1024), HAS_POS_MAP=True, PACKED=packed, BF16_BY_BITS=False))
    return specs


COMPILE_SPECS = kernel_specs()
