"""Triton kernels of one DToMe merge step (README, Semantics: DToMe); launchers live in ``triton.py``.

Five kernels; a fused merge step is four launches (five when the similarity grid is split):

- ``similarity_kernel``: grid (cdiv(ceil(N/2), BLOCK_A), S, B). Normalises a tile of source rows
  (even rows, read straight from the strided metric) in fp32 and streams the destination rows
  (odd rows) of its split through ``tl.dot(..., input_precision="ieee")`` in tiles of BLOCK_B
  (C in chunks of BLOCK_K = 16, masked), keeping a running row max / argmax; the [N/2, N/2] score
  matrix never exists in memory. With S > 1 destination splits (small grids: B = 1 at N = 577
  would be 10 programs for 132 SMs) each split writes its best edge to a scratch row and
  ``similarity_combine_kernel`` reduces the splits in order (strict test: ties keep the
  smaller row, exactly as one program would).
- ``select_kernel``: grid (B,). One program per image: the strict threshold test, the cap rule,
  and stream compaction of the new order into ``row_map`` with ``tl.cumsum`` (two passes over
  chunks of BLOCK, so any N works).
- ``group_rows_kernel``: grid (cdiv(N, BLOCK_I), B). A counting sort of the rows by output row
  without atomics (rank = rows with a smaller key + equal keys before it): ``order`` lists every
  output row's sources contiguously in index order, ``key`` the output row at each position of
  ``order``, with ``start`` / ``count`` per output row.
- ``merge_kernel``: grid (cdiv(N, BLOCK_R), B, cdiv(D, BLOCK_D)). A program owns BLOCK_R
  consecutive output rows, hence one contiguous range of ``order`` (from the start of its first
  row to the end of its last), and walks it CHUNK positions at a time: a [CHUNK, BLOCK_D] gather
  of source rows whatever the rows' counts, times their sizes, reduced per output row by a
  segmented scan (``tl.associative_scan``; a run restarts where ``key`` changes). Rows whose run
  ends in the chunk are written (size-weighted mean, size sum); the run still open at the chunk's
  end is carried in registers into the next step. Owned rows with no source are written as zeros
  (size 0). No row is shared between programs, so nothing is reduced across programs. The
  programs with pid(2) == 0 also compose ``pos_map`` with ``row_map`` (the blocks of pos_map
  strided over the grid).

PACKED (a constexpr of the similarity, selection, grouping and merge kernels): the layout of
``dk.dtome_merge_varlen`` (``dymu_kernels.varlen.triton`` launches it), read and written in place
with no padded [B, W, ...] copy. N is then a bound W on every image's length (it sizes the grids
and the [B, ceil(W/2)] edge scratch); image b's rows are the packed rows cu[b] .. cu[b+1]
(``cu_seqlens``, loaded on the device), its t = cu[b+1] - cu[b] (<= W) rows are the only ones
read, and its image-local scratch (the selection's local new rows, ``order`` / ``key`` /
``start`` / ``count``) lives at packed rows cu[b] .. cu[b] + t of [T] buffers. Output row r of
image b is packed row new_cu[b] + r, new_cu being the exclusive cumsum of the new lengths
(computed on the device between the selection and the grouping). The grouping and merge grids
get one extra program row, b = B: it writes -1 into the packed row_map past the input total,
zeroes x / size past the new total (outputs keep capacity T), and composes pos_map (any shape,
packed rows) with the packed row_map. Semantics per image are exactly the padded ones.

Rules every kernel keeps: integer sizes (N, N0, T, split sizes) are do_not_specialize, strides
are not (so the runtime's divisibility-by-16 and == 1 specialisation gives vectorised gathers);
lengths are clamped to [0, N] (unvalidated GPU inputs never read past the rows; PACKED, the
launcher clamps cu_seqlens into [0, T] and makes it non-decreasing on the device); a NaN score
never forms an edge (a source whose scores are all NaN / -inf gets -inf and -1); no atomics,
so every output is bit-identical run to run.

Limitations (honest notes):
- Verified under TRITON_INTERPRET=1 and by compiling the runtime-specialised variants for
  sm_80 / sm_90 (no spills, vectorised gathers: ``python -m dymu_kernels.compile_check``); not
  yet run or timed on a GPU. On a GPU the merge accumulation may be contracted into FMAs, so x
  can differ from the reference in the last bits (index outputs are exact; sizes are exact for
  integer counts, and agree to rounding otherwise: a row's sources are summed in the scan's fixed
  tree within a chunk and in position order across chunks, not one by one). The chunking is
  fixed by the launch configuration, so results are bit-identical run to run.
- The grouping kernel compares every row with every row of its image: O(N^2) integer compares
  in registers, small next to the O(N*D) feature traffic for ViT sizes (N <= ~1000); PACKED, the
  image's t rows only.
- PACKED grids are sized by the bound W (``max_seqlen``, else T): without a bound every image
  gets cdiv(T, block) programs per kernel, most of which own no rows and do (almost) no work.
- Work per merge program is the number of positions it owns, in CHUNK steps: a flat image whose
  every source goes to one destination (~289 positions at N = 577) costs its owner
  cdiv(positions, CHUNK) steps (5 at CHUNK = 64) while the other programs take one; rows are
  assigned to programs by count of rows, not of sources. Lanes past the owned range in the last
  chunk are masked.
- Scores use IEEE fp32 dots (no TF32), so the similarity kernel runs on the FMA units, not the
  tensor cores; at C <= 128 this is a small part of a step. Source chunks are re-read (from
  L1/L2) for every destination tile, since a runtime loop over C cannot keep them in registers.
- Under TRITON_INTERPRET=1 bf16 arithmetic is wrong and the fp32 -> bf16 cast truncates: every
  load is upcast to fp32 at once, and bf16 outputs are rounded on the bits there
  (BF16_BY_BITS; the GPU path uses the native round-to-nearest-even cast, same result).
"""

import triton
import triton.language as tl


@triton.jit
def _image_rows(lengths_ptr, b, N, PACKED: tl.constexpr):
    """(first packed row, row count t) of image b: PACKED, from cu_seqlens (lengths_ptr [B + 1]);
    else (0, lengths[b]). t is clamped to [0, N], so unvalidated lengths never read past N rows."""
    if PACKED:
        first_row = tl.load(lengths_ptr + b)
        t = tl.load(lengths_ptr + b + 1) - first_row
    else:
        first_row = 0
        t = tl.load(lengths_ptr + b)
    return first_row, tl.minimum(tl.maximum(t, 0), N)


@triton.jit(do_not_specialize=["N", "dst_per_split"])
def similarity_kernel(
    metric_ptr,  # [B, N, C] fp16/bf16/fp32, any strides (PACKED: [T, C] packed rows)
    lengths_ptr,  # [B] int32 (clamped to [0, N] here); PACKED: cu_seqlens [B + 1], N = the bound W
    node_max_ptr,  # [S, B, NA] fp32 out (S = number of destination splits; S = 1: the output)
    node_idx_ptr,  # [S, B, NA] int32 out
    N,
    C,
    stride_mb,
    stride_mn,
    stride_mc,
    dst_per_split,  # destinations per split, a multiple of BLOCK_B
    PROTECT_FIRST: tl.constexpr,
    PACKED: tl.constexpr,  # image b = packed rows cu[b] .. cu[b+1] (stride_mb unused)
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C is walked in chunks of BLOCK_K (>= 16, masked past C): the FMA lowering of an IEEE fp32
    # dot keeps whole operand tiles in registers, and a full 64 x 64 x 64 tile spills.
    pid_a = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    num_src = (N + 1) // 2
    first_row, t = _image_rows(lengths_ptr, b, N, PACKED)
    if PACKED:
        base = metric_ptr + first_row.to(tl.int64) * stride_mn
    else:
        base = metric_ptr + b.to(tl.int64) * stride_mb
    kc = tl.arange(0, BLOCK_K)

    src = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)  # source i is row 2i
    src_ok = 2 * src < t
    if PROTECT_FIRST:
        src_ok = src_ok & (src != 0)
    a_ptr = base + (2 * src)[:, None].to(tl.int64) * stride_mn
    # Masked loads with other=0: NaN in padding rows never enters the arithmetic.
    a_sq = tl.zeros([BLOCK_A], tl.float32)
    for c0 in range(0, C, BLOCK_K):
        a = tl.load(a_ptr + (c0 + kc)[None, :] * stride_mc, mask=src_ok[:, None] & (c0 + kc < C)[None, :], other=0.0)
        a = a.to(tl.float32)
        a_sq += tl.sum(a * a, axis=1)
    a_norm = tl.maximum(tl.sqrt_rn(a_sq), 1e-12)

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_row = tl.full([BLOCK_A], -1, tl.int32)
    num_dst = t // 2  # valid odd rows: 1, 3, ..., < t
    lo = split * dst_per_split
    hi = tl.minimum(lo + dst_per_split, num_dst)
    hi = tl.where(2 * pid_a * BLOCK_A < t, hi, lo)  # a tile past the image's rows: no scores to find
    for start in range(lo, hi, BLOCK_B):
        dst = start + tl.arange(0, BLOCK_B)  # destination j is row 2j + 1
        dst_ok = dst < hi
        m_ptr = base + (2 * dst + 1)[None, :].to(tl.int64) * stride_mn  # loaded transposed: [K, BLOCK_B]
        m_sq = tl.zeros([BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_K):
            m = tl.load(m_ptr + (c0 + kc)[:, None] * stride_mc, mask=dst_ok[None, :] & (c0 + kc < C)[:, None], other=0.0)
            m = m.to(tl.float32)
            m_sq += tl.sum(m * m, axis=0)
        m_norm = tl.maximum(tl.sqrt_rn(m_sq), 1e-12)
        scores = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_K):
            k_ok = c0 + kc < C
            a = tl.load(a_ptr + (c0 + kc)[None, :] * stride_mc, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
            m = tl.load(m_ptr + (c0 + kc)[:, None] * stride_mc, mask=dst_ok[None, :] & k_ok[:, None], other=0.0)
            a = tl.div_rn(a.to(tl.float32), a_norm[:, None])  # m / max(||m||, 1e-12), as F.normalize
            m = tl.div_rn(m.to(tl.float32), m_norm[None, :])
            scores = tl.dot(a, m, scores, input_precision="ieee")  # [BLOCK_A, BLOCK_B] fp32
        # NaN rule: a NaN score (a non-finite metric row) never forms an edge.
        scores = tl.where(dst_ok[None, :] & (scores == scores), scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_arg = tl.argmax(scores, axis=1, tie_break_left=True)  # ties -> smallest row
        better = tile_best > best  # strict: an earlier (smaller) row keeps a tie
        best = tl.where(better, tile_best, best)
        best_row = tl.where(better, 2 * (start + tile_arg) + 1, best_row)

    found = src_ok & (best > float("-inf"))
    out = (split * tl.num_programs(2) + b).to(tl.int64) * num_src + src
    store_ok = src < num_src
    tl.store(node_max_ptr + out, tl.where(found, best, float("-inf")), mask=store_ok)
    tl.store(node_idx_ptr + out, tl.where(found, best_row, -1), mask=store_ok)


@triton.jit(do_not_specialize=["total", "num_splits"])
def similarity_combine_kernel(
    part_max_ptr,  # [S, B, NA] fp32: each destination split's best edge
    part_idx_ptr,  # [S, B, NA] int32
    node_max_ptr,  # [B, NA] fp32 out
    node_idx_ptr,  # [B, NA] int32 out
    total,  # B * NA
    num_splits,
    BLOCK: tl.constexpr,
):
    # Splits in order with a strict test: the smaller row (an earlier split) keeps a tie.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    best = tl.load(part_max_ptr + offs, mask=ok, other=float("-inf"))
    best_row = tl.load(part_idx_ptr + offs, mask=ok, other=-1)
    for s in range(1, num_splits):
        m = tl.load(part_max_ptr + s * total + offs, mask=ok, other=float("-inf"))
        i = tl.load(part_idx_ptr + s * total + offs, mask=ok, other=-1)
        better = m > best
        best = tl.where(better, m, best)
        best_row = tl.where(better, i, best_row)
    tl.store(node_max_ptr + offs, best, mask=ok)
    tl.store(node_idx_ptr + offs, best_row, mask=ok)


@triton.jit(do_not_specialize=["N"])
def select_kernel(
    node_max_ptr,  # [B, NA] fp32, contiguous
    node_idx_ptr,  # [B, NA] int32, contiguous
    lengths_ptr,  # [B] int32; PACKED: cu_seqlens [B + 1] (N = the bound W)
    tau_ptr,  # [B] fp32
    row_map_ptr,  # [B, N] int32 out; PACKED: [T], image b's local new rows at cu[b] .. cu[b+1]
    new_lengths_ptr,  # [B] int32 out
    N,
    PROTECT_FIRST: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    num_src = (N + 1) // 2
    num_dst = N // 2
    first_row, t = _image_rows(lengths_ptr, b, N, PACKED)
    if PACKED:  # only the image's own rows are written: the next image's follow at once
        rm_base = row_map_ptr + first_row.to(tl.int64)
        rows_end = t
    else:
        rm_base = row_map_ptr + b.to(tl.int64) * N
        rows_end = N  # padding rows get -1
    tau = tl.load(tau_ptr + b)
    nm_base = node_max_ptr + b.to(tl.int64) * num_src
    idx_base = node_idx_ptr + b.to(tl.int64) * num_src
    lanes = tl.arange(0, BLOCK)

    # Pass 1: how many pass the strict test, how many valid sources fail it, and the passing
    # source with the smallest score (ties -> smallest row), the one the cap keeps.
    passed = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    failed = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    weakest = tl.max(tl.full([BLOCK], float("inf"), tl.float32), axis=0)
    weakest_src = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, num_src, BLOCK):
        src = start + lanes
        in_range = src < num_src
        score = tl.load(nm_base + src, mask=in_range, other=float("-inf"))
        merged = (score > tau) & in_range
        passed += tl.sum(merged.to(tl.int32), axis=0)
        failed += tl.sum(((2 * src < t) & ~merged).to(tl.int32), axis=0)
        keyed = tl.where(merged, score, float("inf"))
        chunk_min = tl.min(keyed, axis=0)
        chunk_arg = tl.argmin(keyed, axis=0, tie_break_left=True) + start
        weakest_src = tl.where(chunk_min < weakest, chunk_arg, weakest_src)
        weakest = tl.minimum(chunk_min, weakest)

    if PROTECT_FIRST:
        cap = tl.maximum((t - 1) // 2, 0)
    else:
        cap = t // 2
    over = passed > cap  # by exactly one when it bites: the weakest source stays
    num_unmerged = failed + (over & (2 * weakest_src < t)).to(tl.int32)
    tl.store(new_lengths_ptr + b, t - passed + over.to(tl.int32))

    # Pass 2: new order [unmerged sources in order ; destinations in order], then padding.
    running = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, num_src, BLOCK):
        src = start + lanes
        in_range = src < num_src
        score = tl.load(nm_base + src, mask=in_range, other=float("-inf"))
        merged = (score > tau) & in_range & ~(over & (src == weakest_src))
        unmerged = (2 * src < t) & ~merged
        unmerged_i = unmerged.to(tl.int32)
        src_new = running + tl.cumsum(unmerged_i, axis=0) - 1
        running += tl.sum(unmerged_i, axis=0)
        # A merged source takes its destination's new row (odd row 2j+1 -> num_unmerged + j).
        idx = tl.load(idx_base + src, mask=in_range, other=-1)
        dst_col = tl.minimum((tl.maximum(idx, 1) - 1) // 2, num_dst - 1)
        dst_of_src = tl.where((dst_col >= 0) & (2 * dst_col + 1 < t), num_unmerged + dst_col, -1)
        new_row = tl.where(merged, dst_of_src, tl.where(unmerged, src_new, -1))
        tl.store(rm_base + 2 * src, new_row, mask=in_range & (2 * src < rows_end))
        dst = src  # destination j is row 2j + 1
        dst_new = tl.where(2 * dst + 1 < t, num_unmerged + dst, -1)
        tl.store(rm_base + 2 * dst + 1, dst_new, mask=(dst < num_dst) & (2 * dst + 1 < rows_end))


@triton.jit
def round_to_bf16(v):
    """fp32 -> bf16 rounding to nearest even on the bits (the interpreter's cast truncates)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["N", "T"])
def group_rows_kernel(
    row_map_ptr,  # [B, N] int32, contiguous: output row of every input row (< 0 or >= N: none)
    order_ptr,  # [B, N] int32 out: input rows sorted by output row, stable (unmapped rows last)
    key_ptr,  # [B, N] int32 out: the output row of order's entry at each position (N: unmapped)
    start_ptr,  # [B, N] int32 out: first position in order of output row r's sources
    count_ptr,  # [B, N] int32 out: number of sources of output row r
    cu_ptr,  # PACKED: [B + 1] int32 cu_seqlens of the input
    new_cu_ptr,  # PACKED: [B + 1] int32 cu_seqlens of the output
    packed_map_ptr,  # PACKED: [T] int32 out, the packed row_map (new packed row of every row)
    N,
    T,  # PACKED: packed rows (capacity)
    PACKED: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # A counting sort without atomics: rank(i) = #{j : key_j < key_i} + #{j < i : key_j = key_i},
    # counted against every row in chunks of BLOCK_J; O(N^2) compares per image, all in registers.
    # PACKED (grid axis 1 = B + 1): image b's rows, keys (its local new rows, N = the bound W) and
    # scratch live at packed rows cu[b] .. cu[b+1]; only its t rows are sorted (O(t^2)). Program
    # row B writes -1 into the packed row_map past the input total.
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if PACKED:
        if b == tl.num_programs(1) - 1:
            for r0 in range(tl.load(cu_ptr + b) + pid * BLOCK_I, T, tl.num_programs(0) * BLOCK_I):
                r = r0 + tl.arange(0, BLOCK_I)
                tl.store(packed_map_ptr + r, tl.full([BLOCK_I], -1, tl.int32), mask=r < T)
            return
        lo = tl.load(cu_ptr + b)
        base = lo.to(tl.int64)
        limit = tl.minimum(tl.load(cu_ptr + b + 1) - lo, N)
    else:
        base = b.to(tl.int64) * N
        limit = N
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)  # input rows, and output rows for start / count
    i_ok = i < limit
    key_i = tl.load(row_map_ptr + base + i, mask=i_ok, other=-1)
    key_i = tl.where((key_i >= 0) & (key_i < N), key_i, N)
    rank = tl.zeros([BLOCK_I], tl.int32)
    below = tl.zeros([BLOCK_I], tl.int32)
    same = tl.zeros([BLOCK_I], tl.int32)
    j_end = tl.where(pid * BLOCK_I < limit, limit, 0)  # a program past the image's rows compares nothing
    for j0 in range(0, j_end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        key_j = tl.load(row_map_ptr + base + j, mask=j < limit, other=-1)
        key_j = tl.where((key_j >= 0) & (key_j < N), key_j, N)
        key_j = tl.where(j < limit, key_j, N + 1)  # past the rows: after everything, counted nowhere
        before = (key_j[None, :] < key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
        below += tl.sum((key_j[None, :] < i[:, None]).to(tl.int32), axis=1)
        same += tl.sum((key_j[None, :] == i[:, None]).to(tl.int32), axis=1)
    tl.store(order_ptr + base + rank, i, mask=i_ok)  # a permutation: no two rows share a rank
    tl.store(key_ptr + base + rank, key_i, mask=i_ok)
    tl.store(start_ptr + base + i, below, mask=i_ok)
    tl.store(count_ptr + base + i, same, mask=i_ok)
    if PACKED:
        new_lo = tl.load(new_cu_ptr + b)
        tl.store(packed_map_ptr + base + i, tl.where(key_i < N, new_lo + key_i, -1), mask=i_ok)


@triton.jit
def _segmented_add(head_a, sum_a, head_b, sum_b):
    """Combine of a segmented inclusive sum: a run restarts where head is set."""
    return head_a | head_b, tl.where(head_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _compose_pos_map(pos_map_ptr, pos_out_ptr, row_map_ptr, num_pos, num_rows, BLOCK_P: tl.constexpr):
    """pos_out[p] = row_map[pos_map[p]] for p < num_pos (-1 where pos_map is outside [0,
    num_rows)), in blocks of BLOCK_P strided over the row programs (grid axis 0)."""
    offs_p = tl.arange(0, BLOCK_P)
    for q0 in range(tl.program_id(0) * BLOCK_P, num_pos, tl.num_programs(0) * BLOCK_P):
        q = q0 + offs_p
        q_ok = q < num_pos
        pos = tl.load(pos_map_ptr + q, mask=q_ok, other=-1)
        pos_ok = q_ok & (pos >= 0) & (pos < num_rows)
        moved = tl.load(row_map_ptr + pos, mask=pos_ok, other=-1)
        tl.store(pos_out_ptr + q, tl.where(pos_ok, moved, -1), mask=q_ok)


@triton.jit(do_not_specialize=["N", "N0", "T"])
def merge_kernel(
    x_ptr,  # [B, N, D] fp16/bf16/fp32, any strides (PACKED: [T, D])
    size_ptr,  # [B, N] fp32, contiguous (PACKED: [T])
    order_ptr,  # [B, N] int32: input rows grouped by output row (group_rows_kernel)
    key_ptr,  # [B, N] int32: output row of each position of order
    start_ptr,  # [B, N] int32: first position in order of output row r's sources
    count_ptr,  # [B, N] int32: number of sources of output row r
    row_map_ptr,  # [B, N] int32, contiguous (read for pos_map only; PACKED: the packed [T] map)
    x_out_ptr,  # [B, N, D] x.dtype out, contiguous (PACKED: [T, D])
    size_out_ptr,  # [B, N] fp32 out (PACKED: [T])
    pos_map_ptr,  # [B, N0] int32 (HAS_POS_MAP), contiguous (PACKED: [N0] packed rows)
    pos_out_ptr,  # [B, N0] int32 out (HAS_POS_MAP)
    cu_ptr,  # PACKED: [B + 1] int32 cu_seqlens of the input
    new_cu_ptr,  # PACKED: [B + 1] int32 cu_seqlens of the output
    N,
    D,
    N0,
    T,  # PACKED: packed rows (capacity)
    stride_xb,
    stride_xn,
    stride_xd,
    HAS_POS_MAP: tl.constexpr,
    PACKED: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,  # round bf16 outputs by hand (interpreter only)
    BLOCK_R: tl.constexpr,  # output rows owned by one program
    CHUNK: tl.constexpr,  # positions of order gathered per step
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # A program owns the output rows [r0, r0 + BLOCK_R) and so the positions [start[r0], end of
    # its last row) of order: their sources, sorted by output row. It walks them CHUNK at a time
    # (a [CHUNK, BLOCK_D] gather whatever the rows' counts), reduces the products size * x per
    # output row with a segmented scan, writes every row whose run ends in the chunk and
    # carries the run that continues past the chunk into the next step. Fixed chunking and a
    # fixed scan tree: bit-identical run to run; no other program touches these rows.
    # PACKED (grid axis 1 = B + 1): image b reads its rows and scratch at cu[b] + local row and
    # writes its t_new output rows at new_cu[b] + local row; program row B zeroes the rows past
    # the new total and composes pos_map with the packed row_map.
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r0 = pid_r * BLOCK_R
    if PACKED:
        # No early exit (an early return put registers on the stack): the tail row B owns no
        # rows (limit 0) and does its own work at the end.
        image = b < tl.num_programs(1) - 1
        in_base = tl.load(cu_ptr + b).to(tl.int64)
        out_base = tl.load(new_cu_ptr + b).to(tl.int64)
        new_len = tl.load(new_cu_ptr + b + 1, mask=image, other=0) - out_base
        limit = tl.where(image, tl.minimum(new_len, N), 0)
        x_base = x_ptr + in_base * stride_xn
    else:
        in_base = b.to(tl.int64) * N
        out_base = in_base
        limit = N
        x_base = x_ptr + b.to(tl.int64) * stride_xb
    out_rows = r0 + tl.arange(0, BLOCK_R)
    r_ok = out_rows < limit

    # Owned rows with no source: zeros (size 0).
    count = tl.load(count_ptr + in_base + out_rows, mask=r_ok, other=1)
    empty = r_ok & (count == 0)
    zero_ptrs = x_out_ptr + (out_base + out_rows)[:, None] * D + offs_d[None, :]
    tl.store(zero_ptrs, tl.zeros([BLOCK_R, BLOCK_D], tl.float32).to(x_out_ptr.dtype.element_ty),
             mask=empty[:, None] & d_ok[None, :])

    owns = r0 < limit  # PACKED: programs past the image's new length own nothing
    last = tl.minimum(r0 + BLOCK_R, limit) - 1
    p_lo = tl.load(start_ptr + in_base + r0, mask=owns, other=0)
    p_hi = tl.load(start_ptr + in_base + last, mask=owns, other=0) + tl.load(count_ptr + in_base + last, mask=owns, other=0)
    lanes = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], tl.float32)  # the run still open at the end of the last chunk
    carry_size = tl.sum(tl.zeros([CHUNK], tl.float32), axis=0)
    carry_key = tl.sum(tl.zeros([CHUNK], tl.int32), axis=0) - 1
    for p0 in range(p_lo, p_hi, CHUNK):
        p = p0 + lanes
        ok = p < p_hi
        i = tl.load(order_ptr + in_base + p, mask=ok, other=0)
        key = tl.load(key_ptr + in_base + p, mask=ok, other=-1)
        key_prev = tl.load(key_ptr + in_base + p - 1, mask=ok & (lanes > 0), other=-1)
        key_next = tl.load(key_ptr + in_base + p + 1, mask=p + 1 < p_hi, other=-1)
        s = tl.load(size_ptr + in_base + i, mask=ok, other=0.0)
        xi = tl.load(
            x_base + i[:, None].to(tl.int64) * stride_xn + offs_d[None, :] * stride_xd,
            mask=ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = xi.to(tl.float32) * s[:, None]
        # The run open at the previous chunk's end continues into lane 0 (carry first: sums run
        # in position order across chunk boundaries).
        joins = (lanes == 0) & (key == carry_key)
        v = tl.where(joins[:, None], carry[None, :] + v, v)
        s = tl.where(joins, carry_size + s, s)
        head = ((lanes == 0) | (key != key_prev)).to(tl.int32)
        _, acc = tl.associative_scan((tl.broadcast_to(head[:, None], [CHUNK, BLOCK_D]), v), 0, _segmented_add)
        _, total = tl.associative_scan((head, s), 0, _segmented_add)
        # A row is complete at the last position of its run.
        done = ok & (key != key_next)
        mean = tl.where(total[:, None] > 0, tl.div_rn(acc, tl.maximum(total, 1e-30)[:, None]), 0.0)
        out_ptrs = x_out_ptr + (out_base + key)[:, None] * D + offs_d[None, :]
        if BF16_BY_BITS:
            tl.store(out_ptrs, round_to_bf16(mean), mask=done[:, None] & d_ok[None, :])
        else:
            tl.store(out_ptrs, mean.to(x_out_ptr.dtype.element_ty), mask=done[:, None] & d_ok[None, :])
        if pid_d == 0:
            tl.store(size_out_ptr + out_base + key, total, mask=done)
        at_end = lanes == CHUNK - 1
        carry = tl.sum(tl.where(at_end[:, None], acc, 0.0), axis=0)
        carry_size = tl.sum(tl.where(at_end, total, 0.0), axis=0)
        carry_key = tl.sum(tl.where(at_end, key, 0), axis=0)

    if pid_d == 0:
        tl.store(size_out_ptr + out_base + out_rows, tl.zeros([BLOCK_R], tl.float32), mask=empty)
    if PACKED:
        if b == tl.num_programs(1) - 1:
            # Row B: zero the rows past the new total, compose pos_map with the packed row_map
            # (complete: group_rows_kernel ran before).
            rows = tl.arange(0, BLOCK_R)
            for t0 in range(tl.load(new_cu_ptr + b) + r0, T, tl.num_programs(0) * BLOCK_R):
                tail = t0 + rows
                tail_ok = tail < T
                tl.store(x_out_ptr + tail.to(tl.int64)[:, None] * D + offs_d[None, :],
                         tl.zeros([BLOCK_R, BLOCK_D], tl.float32).to(x_out_ptr.dtype.element_ty),
                         mask=tail_ok[:, None] & d_ok[None, :])
                tl.store(size_out_ptr + tail, tl.zeros([BLOCK_R], tl.float32), mask=tail_ok & (pid_d == 0))
            if HAS_POS_MAP:  # over the whole packed pos_map, on one feature block
                _compose_pos_map(pos_map_ptr, pos_out_ptr, row_map_ptr, tl.where(pid_d == 0, N0, 0), T, BLOCK_P)
    else:
        if HAS_POS_MAP:
            if pid_d == 0:  # image b's pos_map rows
                _compose_pos_map(pos_map_ptr + b.to(tl.int64) * N0, pos_out_ptr + b.to(tl.int64) * N0,
                                 row_map_ptr + in_base, N0, N, BLOCK_P)
