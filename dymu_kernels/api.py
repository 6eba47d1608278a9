"""Public ops: validate the arguments, normalise them, and dispatch to a backend.

This is the one place that checks inputs and picks a backend; the backends (``dtome/*.py``,
``vtu/*.py``) receive normalised arguments. Every op is inference-only (no autograd), never
synchronises with the host (value checks on GPU tensors only with ``validate=True`` or
DYMU_VALIDATE=1), and accepts ``backend=None | "reference" | "native" | "triton"``.

Every op is a ``torch.library`` custom op ``torch.ops.dymu.<op>`` (see ``_ops.py``), so it
traces whole under torch.compile (``fullgraph=True``) and in CUDA graphs. While compiling,
the wrappers run the metadata checks (types, ranks, dtypes, shapes, devices) but skip every
check that reads tensor values (lengths / maps in range, NaN thresholds): validate eagerly
first. Inputs that require grad under grad mode get one warning per op (inference-only: run
under ``torch.no_grad()`` or ``torch.inference_mode()``).
"""

from typing import Optional, Tuple, Union

import torch

from . import _backends, _ops
from . import _validate as check
from .dtome.reference import DToMeResult

Threshold = Union[float, torch.Tensor]

MAX_METRIC_DIM = 128
MAX_HEAD_DIM = 128


def _run(op: str, device: torch.device, backend: Optional[str], *args):
    """Pick the backend for ``op`` (in Python, before the call) and run it.

    Ops registered in ``_ops.SPECS`` go through their functional custom op
    ``torch.ops.dymu.<op>(backend, *args)``, which torch.compile traces as one node; an op
    not registered yet is called directly (eager only: it may break a compiled graph).
    """
    chosen = _backends.select_for_call(op, device, backend)
    with torch.no_grad():
        if _ops.registered(op):
            return _ops.call(op, chosen, *args)
        return getattr(_backends.module(chosen, _backends.FAMILIES[op]), op)(*args)


def _metric(metric: torch.Tensor) -> torch.Tensor:
    check.tensor("metric", metric, 3, check.FLOAT_DTYPES, "[B, N, C]")
    if metric.shape[1] < 1:
        raise ValueError(f"metric must have at least one row (N >= 1), got shape {tuple(metric.shape)}")
    if not 1 <= metric.shape[2] <= MAX_METRIC_DIM:
        raise ValueError(f"metric dim C must be in [1, {MAX_METRIC_DIM}], got {metric.shape[2]}")
    return metric


def bipartite_similarity(
    metric: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    protect_first: bool = False,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best destination of every source token (DToMe steps 1-3).

    Args:
        metric: [B, N, C] fp16/bf16/fp32, C <= 128: the merge metric (keys averaged over
            heads). Rows >= lengths[b] are padding and may hold anything, NaN included.
        lengths: [B] int32/int64 valid rows per image, in [0, N] (default N).
        protect_first: row 0 (a CLS token) never merges.

    Returns:
        node_max [B, ceil(N/2)] float32: best cosine score (IEEE fp32) of source row 2i over the
        valid odd rows; -inf where row 2i is padding, protected, or has no valid destination.
        node_idx [B, ceil(N/2)] int32: the absolute (odd) row reaching it, smallest on ties;
        -1 where node_max is -inf.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.bipartite_similarity``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    _metric(metric)
    protect_first = check.flag("protect_first", protect_first)
    check.warn_if_grad("bipartite_similarity", metric)
    bsz, n, _ = metric.shape
    lengths = check.lengths("lengths", lengths, bsz, n, metric.device, validate)
    return _run("bipartite_similarity", metric.device, backend, metric, lengths, protect_first)


def select_edges(
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    lengths: Optional[torch.Tensor],
    threshold: Threshold,
    num_rows: int,
    *,
    protect_first: bool = False,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Threshold the best edges and compute the new token order (DToMe steps 4 and 6).

    A source merges iff node_max > threshold (strict; +inf merges nothing, -inf every source
    with a destination), capped at floor((t - p) / 2) merges (p = 1 with protect_first); when
    the cap bites, the merged source with the smallest node_max (then smallest row) stays.

    Args:
        node_max, node_idx: [B, ceil(N/2)] from :func:`bipartite_similarity`.
        lengths: [B] int valid rows per image (None: N).
        threshold: a real number (Python / NumPy scalar), or a 0-dim / [B] float tensor on any
            device (per-image thresholds; copied to node_max's device). NaN is an error.
        num_rows: N (node_max alone cannot tell N = 2k-1 from 2k).
        protect_first: bool; row 0 (a CLS token) never merges.

    Entries of node_max at padding or protected sources, NaN entries, and entries whose
    node_idx is not a valid destination (an odd row < lengths[b]) are no edge: new_lengths is
    always consistent with lengths, whatever node_max holds there.

    Returns:
        row_map [B, N] int32: new row of every old row (merged sources -> their destination's
        new row; -1 for padding). New order: unmerged sources in order, then destinations.
        new_lengths [B] int32: lengths minus merges.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.select_edges``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    if not isinstance(num_rows, torch.SymInt) and (
        isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1
    ):
        raise ValueError(f"num_rows must be an int >= 1 (N), got {num_rows!r}")
    protect_first = check.flag("protect_first", protect_first)
    check.warn_if_grad("select_edges", node_max, threshold)
    check.tensor("node_max", node_max, 2, (torch.float32,), "[B, ceil(N/2)] float32")
    check.tensor("node_idx", node_idx, 2, check.INDEX_DTYPES, "[B, ceil(N/2)] int32")
    bsz = node_max.shape[0]
    expected = (bsz, (num_rows + 1) // 2)
    for name, t in (("node_max", node_max), ("node_idx", node_idx)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} ([B, ceil(N/2)] for N = {num_rows}), got {tuple(t.shape)}")
    device = node_max.device
    check.same_device(device, node_idx=node_idx)
    lengths = check.lengths("lengths", lengths, bsz, num_rows, device, validate)
    check.index_range("node_idx", node_idx, -1, num_rows, validate)
    tau = check.threshold(threshold, bsz, device, validate)
    node_idx = node_idx.to(torch.int32)
    # Derive consistency with lengths instead of trusting it: an entry is an edge only at a
    # valid (unprotected) source whose node_idx is a valid destination (odd row < lengths).
    src_rows = torch.arange(0, num_rows, 2, device=device)
    edge = (src_rows < lengths[:, None]) & (node_idx >= 1) & (node_idx < lengths[:, None]) & (node_idx % 2 == 1)
    if protect_first:
        edge = edge & (src_rows > 0)
    node_max = torch.where(edge, node_max, float("-inf"))
    return _run("select_edges", device, backend, node_max, node_idx, lengths, tau, num_rows, protect_first)


def scatter_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    row_map: torch.Tensor,
    new_lengths: torch.Tensor,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of rows into their new rows (DToMe step 5), fp32 accumulation.

    x'_r = sum_{i -> r} s_i x_i / sum_{i -> r} s_i, s'_r = sum_{i -> r} s_i.

    Args:
        x: [B, N, D] fp16/bf16/fp32 token features (padding rows may hold anything).
        size: [B, N] float sizes (counts of original patches); rows with row_map -1 are ignored.
        row_map: [B, N] int32/int64 from :func:`select_edges`, values in [-1, new_lengths[b]).
        new_lengths: [B] int rows kept per image.

    Returns:
        x_out [B, N, D] in x.dtype and size_out [B, N] float32; rows >= new_lengths are zero.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.scatter_merge``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    check.tensor("x", x, 3, check.FLOAT_DTYPES, "[B, N, D]")
    bsz, n, _ = x.shape
    check.tensor("size", size, 2, check.FLOAT_DTYPES, "[B, N] float sizes")
    check.warn_if_grad("scatter_merge", x, size)
    check.tensor("row_map", row_map, 2, check.INDEX_DTYPES, "[B, N] int32")
    for name, t in (("size", size), ("row_map", row_map)):
        if tuple(t.shape) != (bsz, n):
            raise ValueError(f"{name} must have shape {(bsz, n)} like x's [B, N], got {tuple(t.shape)}")
    device = x.device
    check.same_device(device, size=size, row_map=row_map)
    new_lengths = check.lengths("new_lengths", new_lengths, bsz, n, device, validate)
    if check.values_checkable(row_map, validate):
        check.index_range("row_map", row_map, -1, n, validate)
        beyond = row_map >= new_lengths[:, None]
        if bool(beyond.any()):
            raise ValueError("row_map points at rows >= new_lengths (expected values in [-1, new_lengths[b]))")
    return _run(
        "scatter_merge", device, backend, x, size.float(), row_map.to(torch.int32), new_lengths
    )


def dtome_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    threshold: Threshold,
    *,
    pos_map: Optional[torch.Tensor] = None,
    protect_first: bool = False,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> DToMeResult:
    """One fused DToMe merge step: similarity, threshold selection, merge and bookkeeping.

    Args:
        x: [B, N, D] fp16/bf16/fp32 tokens; rows >= lengths[b] are padding (anything, NaN too).
        metric: [B, N, C] merge metric, C <= 128 (any float dtype).
        size: [B, N] float sizes of the tokens (None: all ones).
        lengths: [B] int valid rows (None: N).
        threshold: a real number (Python / NumPy scalar) or a 0-dim / [B] float tensor on any
            device; strict test node_max > threshold. NaN is an error.
        pos_map: optional [B, N0] int map from every original token to its current row
            (-1 allowed for absent tokens); returned composed with this step's row_map.
        protect_first: bool; row 0 (CLS) never merges.

    NaN rule: a valid metric row holding NaN/inf scores NaN against every row, and a NaN
    score never forms an edge (that source stays, that destination is never chosen).

    Returns:
        DToMeResult(x [B, N, D] x.dtype, size [B, N] float32, lengths [B] int32,
        pos_map [B, N0] int32 or None, row_map [B, N] int32). Kept rows come first in the order
        [unmerged sources ; destinations]; rows >= lengths are zero. The tensors keep the static
        upper bound N: shrinking to lengths.max() is the caller's (explicit, synchronising) step.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.dtome_merge``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    check.tensor("x", x, 3, check.FLOAT_DTYPES, "[B, N, D]")
    _metric(metric)
    protect_first = check.flag("protect_first", protect_first)
    check.warn_if_grad("dtome_merge", x, metric, size, threshold if isinstance(threshold, torch.Tensor) else None)
    bsz, n, _ = x.shape
    if tuple(metric.shape[:2]) != (bsz, n):
        raise ValueError(f"metric must be [B, N, C] with B, N = {bsz}, {n} like x, got {tuple(metric.shape)}")
    device = x.device
    check.same_device(device, metric=metric, size=size, pos_map=pos_map)
    if size is None:
        size = torch.ones(bsz, n, dtype=torch.float32, device=device)
    check.tensor("size", size, 2, check.FLOAT_DTYPES, "[B, N] float sizes")
    if tuple(size.shape) != (bsz, n):
        raise ValueError(f"size must have shape {(bsz, n)} like x's [B, N], got {tuple(size.shape)}")
    lengths = check.lengths("lengths", lengths, bsz, n, device, validate)
    tau = check.threshold(threshold, bsz, device, validate)
    if pos_map is not None:
        check.tensor("pos_map", pos_map, 2, check.INDEX_DTYPES, "[B, N0] int32")
        if pos_map.shape[0] != bsz:
            raise ValueError(f"pos_map.shape[0] must be the batch size {bsz}, got shape {tuple(pos_map.shape)}")
        check.index_range("pos_map", pos_map, -1, n, validate)
        pos_map = pos_map.to(torch.int32)
    return _run(
        "dtome_merge", device, backend, x, metric, size.float(), lengths, tau, pos_map, protect_first
    )


def batch_threshold(
    node_max: torch.Tensor, r: int, *, backend: Optional[str] = None, validate: Optional[bool] = None
) -> torch.Tensor:
    """Calibration threshold of one layer for one batch (paper eq. 4).

    Args:
        node_max: [B, M] float32 best-edge scores of a batch (from :func:`bipartite_similarity`).
        r: merges per image wanted at this layer, an int in [0, M].

    NaN scores count as -inf (no edge), on every backend.

    Returns:
        0-dim float32 tensor: the (B*r + 1)-th largest node_max of the whole batch, clamped at
        >= 0 (0 when the batch has fewer than B*r + 1 finite scores). With the strict test at
        most B*r edges pass.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.batch_threshold``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    check.tensor("node_max", node_max, 2, (torch.float32,), "[B, M] float32")
    r = check.count("r", r, 0, node_max.shape[1], "merges per image, at most the M sources per image")
    check.warn_if_grad("batch_threshold", node_max)
    node_max = node_max.masked_fill(node_max.isnan(), float("-inf"))  # NaN rule: no edge
    return _run("batch_threshold", node_max.device, backend, node_max, r)


def _check_heads(hq: int, hkv: int, dim: int) -> None:
    """Grouped-query heads (Hq a multiple of Hkv) and an even head dim D <= MAX_HEAD_DIM."""
    if hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv}) for grouped-query attention")
    if dim % 2 != 0 or not 2 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be even and in [2, {MAX_HEAD_DIM}], got {dim}")


def _check_rope_tables(cos, sin, bsz: int, dim: int, positions: int, letter: str) -> None:
    """cos/sin: tensors of one shape [B, Np, D], [1, Np, D] or [Np, D] with Np >= ``positions``."""
    layout = f"[B, {letter}', D] or [{letter}', D]"
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        raise TypeError(f"cos and sin must be tensors ({layout})")
    if tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check.tensor(name, t, t.dim() if t.dim() in (2, 3) else 3, check.FLOAT_DTYPES, layout)
        if t.shape[-1] != dim:
            raise ValueError(f"{name} must be D = {dim} wide (last dim), got shape {tuple(t.shape)}")
        if t.shape[-2] < positions:
            raise ValueError(f"{name} has {t.shape[-2]} rows, fewer than the map's {letter} = {positions} positions")
        if t.dim() == 3 and t.shape[0] not in (1, bsz):
            raise ValueError(f"{name}.shape[0] must be the batch size {bsz} or 1, got shape {tuple(t.shape)}")


def _broadcast_rope_tables(cos, sin, bsz: int):
    """[Np, D] / [1, Np, D] / [B, Np, D] -> [B, Np, D] views (HF rotary output broadcasts over B)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.shape[0] != bsz:
        cos, sin = cos.expand(bsz, *cos.shape[1:]), sin.expand(bsz, *sin.shape[1:])
    return cos, sin


def vtu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    *,
    full_lengths: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Virtual token unmerging attention (README, Semantics: VTU).

    Computes RoPE-rotated attention over the full sequence of Nf positions, where position i
    carries merged row pos_map[b, i], and averages the outputs back into merged rows.

    Args:
        q: [B, Hq, Nu, D] merged queries, RoPE not applied; fp16/bf16/fp32; D even, <= 128.
        k, v: [B, Hkv, Nu, D], same dtype; Hq % Hkv == 0 (query head h reads K/V head
            h // (Hq / Hkv), as HF's repeat_kv).
        cos, sin: [B, Nf', D], [1, Nf', D] or [Nf', D] (HF layout: row i = full position i),
            Nf' >= Nf, broadcast over B; extra rows are ignored.
        pos_map: [B, Nf] int32/int64: merged row in [0, Nu) of every full position.
        full_lengths: [B] int (default Nf): positions >= full_lengths[b] are neither queries nor
            keys and their map entries are ignored (may be -1).
        causal: bool; key j visible to query i iff j <= i (on full positions).
        scale: softmax scale, finite and > 0 (default D ** -0.5).

    Masking rule: K/V values at a position hidden from a query (causal, or >= full_lengths)
    never affect that query's output, NaN/inf included; non-finite values at visible keys
    propagate.

    Returns:
        out [B, Hq, Nu, D] in q.dtype: for each merged row, the mean over the full positions that
        map to it of their attention outputs; rows no valid position maps to are zero.

    Traces whole under torch.compile (custom op ``torch.ops.dymu.vtu_attention``): metadata
    checks run at trace time, value checks (which read data) are skipped while compiling.
    """
    for name, t, layout in (("q", q, "[B, Hq, Nu, D]"), ("k", k, "[B, Hkv, Nu, D]"), ("v", v, "[B, Hkv, Nu, D]")):
        check.tensor(name, t, 4, check.FLOAT_DTYPES, layout)
    causal = check.flag("causal", causal)
    if scale is not None:
        scale = check.positive_finite("scale", scale, "the softmax scale")
    check.warn_if_grad("vtu_attention", q, k, v, cos, sin)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bsz, hq, nu, dim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if k.shape[0] != bsz or k.shape[2] != nu or k.shape[3] != dim:
        raise ValueError(f"k/v must be [B, Hkv, Nu, D] with B, Nu, D = {bsz}, {nu}, {dim} like q, got {tuple(k.shape)}")
    if nu < 1 or hkv < 1:
        raise ValueError(f"need at least one merged row and one head, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    _check_heads(hq, hkv, dim)
    device = q.device
    check.tensor("pos_map", pos_map, 2, check.INDEX_DTYPES, "[B, Nf] int")
    if pos_map.shape[0] != bsz or pos_map.shape[1] < 1:
        raise ValueError(f"pos_map must be [B, Nf] with B = {bsz} and Nf >= 1, got {tuple(pos_map.shape)}")
    nf = pos_map.shape[1]
    _check_rope_tables(cos, sin, bsz, dim, nf, "Nf")
    check.same_device(device, k=k, v=v, cos=cos, sin=sin, pos_map=pos_map)
    full_lengths = check.lengths("full_lengths", full_lengths, bsz, nf, device, validate)
    if check.values_checkable(pos_map, validate):
        valid = torch.arange(nf, device=device) < full_lengths[:, None]
        check.index_range("pos_map", pos_map, 0, nu, validate, mask=valid)
    cos, sin = _broadcast_rope_tables(cos, sin, bsz)
    scale = float(dim**-0.5) if scale is None else scale
    return _run(
        "vtu_attention", device, backend, q, k, v, cos, sin, pos_map.to(torch.int32), full_lengths, causal, scale
    )


def vtu_decode_attention(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    q_positions: torch.Tensor,
    *,
    full_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Causal RoPE attention of queries over a merged KV cache (decode; issue 11).

    The cache holds R unrotated K/V rows and the row of every cached full position; the key
    of position j is rope(k_rows[pos_map[j]], j), rotated when it is read:

        out[b, h, t] = sum_j softmax_j(rope(q[b, h, t], p_t) . rope(k_rows[b, g, pos_map[b, j]], j) * scale)
                       * v_rows[b, g, pos_map[b, j]]

    over the existing positions j <= p_t = q_positions[b, t], j < full_lengths[b]; g = h // (Hq / Hkv).
    No re-merge. With the identity map this is ordinary causal RoPE attention over a standard
    cache; ``vtu_attention`` without its final mean is the case Tq = P, q_positions = 0..P-1.

    Args:
        q: [B, Hq, Tq, D] unrotated queries, fp16/bf16/fp32; D even, <= 128.
        k_rows, v_rows: [B, Hkv, R, D] unrotated key/value rows in q.dtype; Hq % Hkv == 0.
        cos, sin: [B, P', D] or [P', D] (HF layout: row i = position i), P' > every position used.
        pos_map: [B, P] int32/int64: the row in [0, R) of every cached position (ignored, may be
            -1, at positions >= full_lengths[b]).
        q_positions: [B, Tq] int32/int64 in [0, P'): the position of each query.
        full_lengths: [B] int in [0, P] (default P): positions >= full_lengths[b] do not exist.
        scale: softmax scale (default D ** -0.5).

    Returns:
        out [B, Hq, Tq, D] in q.dtype; a query that sees no key gets 0. Values at hidden
        positions (K/V rows, map entries, cos/sin rows), even NaN/inf, never reach an output;
        non-finite values at visible keys propagate.
    """
    check.tensor("q", q, 4, check.FLOAT_DTYPES, "[B, Hq, Tq, D]")
    check.tensor("k_rows", k_rows, 4, check.FLOAT_DTYPES, "[B, Hkv, R, D]")
    check.tensor("v_rows", v_rows, 4, check.FLOAT_DTYPES, "[B, Hkv, R, D]")
    if scale is not None:
        scale = check.positive_finite("scale", scale, "the softmax scale")
    check.warn_if_grad("vtu_decode_attention", q, k_rows, v_rows, cos, sin)
    if k_rows.dtype != q.dtype or v_rows.dtype != q.dtype:
        raise TypeError(f"q, k_rows and v_rows must share one dtype, got {q.dtype}, {k_rows.dtype}, {v_rows.dtype}")
    bsz, hq, tq, dim = q.shape
    if tuple(k_rows.shape) != tuple(v_rows.shape):
        raise ValueError(f"k_rows and v_rows must have the same shape, got {tuple(k_rows.shape)} and {tuple(v_rows.shape)}")
    hkv, num_rows = k_rows.shape[1], k_rows.shape[2]
    if k_rows.shape[0] != bsz or k_rows.shape[3] != dim:
        raise ValueError(f"k_rows/v_rows must be [B, Hkv, R, D] with B, D = {bsz}, {dim} like q, got {tuple(k_rows.shape)}")
    if num_rows < 1 or hkv < 1 or hq < 1:
        raise ValueError(f"need at least one row and one head, got q {tuple(q.shape)}, k_rows {tuple(k_rows.shape)}")
    _check_heads(hq, hkv, dim)
    device = q.device
    check.tensor("pos_map", pos_map, 2, check.INDEX_DTYPES, "[B, P] int")
    if pos_map.shape[0] != bsz or pos_map.shape[1] < 1:
        raise ValueError(f"pos_map must be [B, P] with B = {bsz} and P >= 1, got {tuple(pos_map.shape)}")
    num_pos = pos_map.shape[1]
    check.tensor("q_positions", q_positions, 2, check.INDEX_DTYPES, "[B, Tq] int")
    if tuple(q_positions.shape) != (bsz, tq):
        raise ValueError(f"q_positions must be [B, Tq] = {(bsz, tq)} like q, got {tuple(q_positions.shape)}")
    _check_rope_tables(cos, sin, bsz, dim, num_pos, "P")
    check.same_device(device, k_rows=k_rows, v_rows=v_rows, cos=cos, sin=sin, pos_map=pos_map, q_positions=q_positions)
    full_lengths = check.lengths("full_lengths", full_lengths, bsz, num_pos, device, validate)
    if check.values_checkable(pos_map, validate):
        # one min/max per tensor (this runs every decode step of every layer); the detailed
        # message comes from check.index_range only when something is out of range
        exists = torch.arange(num_pos, device=device) < full_lengths[:, None]
        lo, hi = torch.where(exists, pos_map, 0).aminmax()
        if lo < 0 or hi >= num_rows:
            check.index_range("pos_map", pos_map, 0, num_rows, validate, mask=exists)
        lo, hi = q_positions.aminmax() if q_positions.numel() else (0, 0)
        if lo < 0 or hi >= cos.shape[-2]:
            check.index_range("q_positions", q_positions, 0, cos.shape[-2], validate)
    cos, sin = _broadcast_rope_tables(cos, sin, bsz)
    scale = float(dim**-0.5) if scale is None else scale
    return _run(
        "vtu_decode_attention", device, backend, q, k_rows, v_rows, cos, sin,
        pos_map.to(torch.int32), q_positions.to(torch.int32), full_lengths, scale,
    )  # fmt: skip


# ------------------------------------------------------------------ packed variable-length ops
# (issue 12) Images concatenated row-wise, flash-attention varlen style: image b owns packed
# rows cu_seqlens[b] .. cu_seqlens[b+1]; rows past cu_seqlens[B] are capacity.

from .varlen.reference import DToMeVarlenResult  # noqa: E402


def _cu_seqlens(cu_seqlens: torch.Tensor, num_rows: int, device: torch.device, validate: Optional[bool]) -> torch.Tensor:
    """int32 [B + 1] offsets: 0 first, non-decreasing, total <= num_rows (the capacity T)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor [B + 1] int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32 (flash-attention's varlen convention), got {str(cu_seqlens.dtype).replace('torch.', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1 (1-D, at least 2 entries), got shape {tuple(cu_seqlens.shape)}")
    check.same_device(device, cu_seqlens=cu_seqlens)
    if check.values_checkable(cu_seqlens, validate):
        values = cu_seqlens.tolist()
        if values[0] != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {values[0]}")
        steps = [b for b in range(len(values) - 1) if values[b + 1] < values[b]]
        if steps:
            b = steps[0]
            raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {values[b]} > cu_seqlens[{b + 1}] = {values[b + 1]}")
        if values[-1] > num_rows:
            raise ValueError(f"cu_seqlens total (last entry) {values[-1]} exceeds the {num_rows} packed rows (T) of the inputs")
    return cu_seqlens.contiguous()


def dtome_merge_varlen(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    threshold: Threshold,
    *,
    pos_map: Optional[torch.Tensor] = None,
    protect_first: bool = False,
    max_seqlen: Optional[int] = None,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> DToMeVarlenResult:
    """One DToMe merge step on the packed layout, with exactly ``dtome_merge``'s per-image semantics.

    Args:
        x: [T, D] fp16/bf16/fp32 packed tokens; image b owns rows cu_seqlens[b] ..
            cu_seqlens[b+1]; rows >= cu_seqlens[B] are capacity (anything, NaN too).
        metric: [T, C] merge metric, C <= 128 (any float dtype).
        size: [T] float sizes (None: all ones).
        cu_seqlens: [B + 1] int32 offsets: 0, non-decreasing, last entry (the total) <= T.
        threshold: float or 0-dim / [B] tensor; strict test node_max > threshold.
        pos_map: optional int tensor of any shape ([B, N0] or [T0] ...) holding the packed row in
            [-1, T) of every original token; returned composed with this step's row_map.
        protect_first: the first row of every image (its CLS token) never merges.
        max_seqlen: optional host int, an upper bound on every image's length; lets the
            reference work on [B, max_seqlen] views (O(B * max_seqlen^2)) instead of dense
            [T, T] scores. A bound below a real length is an error for CPU tensors.

    Returns:
        DToMeVarlenResult(x [T, D] x.dtype, size [T] float32, cu_seqlens [B + 1] int32 (new),
        pos_map int32 (pos_map's shape) or None, row_map [T] int32: new packed row of every
        old row, -1 past the old total). Image b's rows come out at new cu_seqlens[b] ..
        cu_seqlens[b+1] in the order ``dtome_merge`` gives them; rows past the new total are
        zero. The capacity stays T (no host sync): shrinking to the new total is the caller's
        (explicit, synchronising) step.
    """
    check.tensor("x", x, 2, check.FLOAT_DTYPES, "[T, D] packed rows")
    check.tensor("metric", metric, 2, check.FLOAT_DTYPES, "[T, C] packed rows")
    num_rows = x.shape[0]
    if num_rows < 1:
        raise ValueError(f"x must have at least one row (T >= 1), got shape {tuple(x.shape)}")
    if metric.shape[0] != num_rows:
        raise ValueError(f"metric must be [T, C] with T = {num_rows} like x, got {tuple(metric.shape)}")
    if not 1 <= metric.shape[1] <= MAX_METRIC_DIM:
        raise ValueError(f"metric dim C must be in [1, {MAX_METRIC_DIM}], got {metric.shape[1]}")
    protect_first = check.flag("protect_first", protect_first)
    check.warn_if_grad("dtome_merge_varlen", x, metric, size, threshold if isinstance(threshold, torch.Tensor) else None)
    device = x.device
    check.same_device(device, metric=metric, size=size, pos_map=pos_map)
    if size is None:
        size = torch.ones(num_rows, dtype=torch.float32, device=device)
    check.tensor("size", size, 1, check.FLOAT_DTYPES, "[T] float sizes")
    if size.shape[0] != num_rows:
        raise ValueError(f"size must have shape ({num_rows},) like x's [T], got {tuple(size.shape)}")
    cu_seqlens = _cu_seqlens(cu_seqlens, num_rows, device, validate)
    tau = check.threshold(threshold, cu_seqlens.shape[0] - 1, device, validate)
    if pos_map is not None:
        if not isinstance(pos_map, torch.Tensor) or pos_map.dtype not in check.INDEX_DTYPES:
            raise TypeError("pos_map must be an int32/int64 tensor of packed rows (e.g. [B, N0])")
        check.index_range("pos_map", pos_map, -1, num_rows, validate)
        pos_map = pos_map.to(torch.int32)
    bound = _max_seqlen(max_seqlen, cu_seqlens, num_rows, validate)
    return _run(
        "dtome_merge_varlen", device, backend, x, metric, size.float(), cu_seqlens, tau, pos_map, bool(protect_first),
        bound,
    )


def proportional_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Block-diagonal multi-head attention over the packed layout with DToMe's log-size key bias.

    out_i = sum_j softmax_j(q_i . k_j * scale + log size_j) v_j over the rows j of i's own image
    (all heads; fp32 scores and softmax).

    Args:
        q, k, v: [T, H, D] (flash-attention's varlen layout), one dtype of fp16/bf16/fp32,
            D even and <= 128; rows >= cu_seqlens[B] are capacity (anything, NaN too).
        size: [T] float sizes of the keys (None: all ones); a key of size 0 is masked.
        cu_seqlens: [B + 1] int32 offsets: 0, non-decreasing, total <= T.
        scale: softmax scale (default D ** -0.5).
        max_seqlen: optional host int, an upper bound on every image's length (flash-attention's
            max_seqlen); it sizes the Triton grid (default T). A bound below a real length is an
            error for CPU tensors (and GPU ones with validation on); unchecked, rows past it
            would stay unwritten.

    Returns:
        out [T, H, D] in q.dtype; rows past the total, and rows of an image whose keys all have
        size 0, are zero.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, 3, check.FLOAT_DTYPES, "[T, H, D] packed rows")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"q, k and v must have one shape [T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    num_rows, heads, dim = q.shape
    if num_rows < 1 or heads < 1:
        raise ValueError(f"need at least one row and one head, got q {tuple(q.shape)}")
    if dim % 2 != 0 or not 2 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be even and in [2, {MAX_HEAD_DIM}], got {dim}")
    device = q.device
    check.same_device(device, k=k, v=v, size=size)
    if size is None:
        size = torch.ones(num_rows, dtype=torch.float32, device=device)
    check.tensor("size", size, 1, check.FLOAT_DTYPES, "[T] float sizes")
    if size.shape[0] != num_rows:
        raise ValueError(f"size must have shape ({num_rows},) like q's [T], got {tuple(size.shape)}")
    cu_seqlens = _cu_seqlens(cu_seqlens, num_rows, device, validate)
    if scale is not None:
        scale = check.positive_finite("scale", scale, "the softmax scale")
    check.warn_if_grad("proportional_attention_varlen", q, k, v, size)
    scale = float(dim**-0.5) if scale is None else scale
    bound = _max_seqlen(max_seqlen, cu_seqlens, num_rows, validate)
    return _run("proportional_attention_varlen", device, backend, q, k, v, size.float(), cu_seqlens, scale, bound)


def _max_seqlen(max_seqlen: Optional[int], cu_seqlens: torch.Tensor, num_rows: int, validate: Optional[bool]) -> int:
    """The host bound on every image's length, checked (CPU / validate) and capped at T."""
    if max_seqlen is None:
        return num_rows
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be None or an int >= 1 (a bound on every image's length), got {max_seqlen!r}")
    if check.values_checkable(cu_seqlens, validate):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest image's length {longest} (from cu_seqlens)")
    return min(max_seqlen, num_rows)
