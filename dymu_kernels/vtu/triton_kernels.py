"""Triton kernels of VTU attention (README, Semantics: VTU); the launcher is ``vtu/triton.py``.

Three kernels, in the order they run:

1. ``vtu_group_rows_kernel``: a stable counting sort of the valid positions by merged row,
   without atomics or a host sync: for BLOCK_R merged rows it scans the map twice (count,
   then place with an in-tile cumsum). Output: row_start/row_count [B, Nu] and the positions
   grouped by row in increasing order, order [B, Nf]. Map entries of valid positions outside
   [0, Nu) are clamped into it (the reference's rule). Work O(Nu * Nf) compares per image,
   vectorised BLOCK_R x BLOCK_P (negligible next to the N_full^2 * D attention).
2. ``vtu_attention_fwd_kernel``: FlashAttention-2-style forward over the full positions taken
   in merged-row order (``order``), tiled on whole merged rows: the program of tile t owns
   the rows whose first slot lies in slots [t * BLOCK_S, (t + 1) * BLOCK_S) and walks all of
   their slots, BLOCK_S per step (past the tile's end when its last row runs on; a program
   whose tile one longer row covers has nothing to do). A step = BLOCK_S query slots x
   GROUP_HEADS query heads of one KV head (tile row m = head m // BLOCK_S, slot m % BLOCK_S),
   so each K/V tile is gathered through ``pos_map`` and rotated (RoPE, fp32, in registers)
   once for the whole GQA group, or once per chunk of GROUP_HEADS <= BLOCK_M // 16 heads for
   larger groups (Qwen2's 7:1 takes 2 programs at BLOCK_M = 64, 4 at 32), so a step keeps
   >= 16 slots. Online softmax in fp32 with exp2. Key tiles below the step's smallest query
   position run unmasked; the rest are masked by where-selects (hidden NaN/inf K or V never
   leak; a non-finite V at a visible key makes that query's output NaN). Epilogue of a step:
   the slots' outputs summed per merged-row run by a segmented scan (fixed order), each row
   that ends in the step gets its mean written; the row still open at the step's end passes
   its fp32 partial sum to the next step through a small carry buffer, [B, Hq, min(Nu,
   num_tiles), D] (one entry per program and head). Every row is written by one program, so
   nothing is reduced across programs.
3. ``vtu_zero_empty_rows_kernel``: rows with no valid position written as 0.

Everything is bit-identical run to run (no atomics, fixed reduction orders).

Limitations:
- Head dim D must be even and <= 128; the two RoPE halves are padded separately to a power
  of two >= 16 (D = 72/80/96 use 2 x 64 columns, D <= 32 use 2 x 16).
- fp32 inputs use IEEE fp32 dots (no TF32): exact but slow on tensor-core GPUs. The two
  divisions (softmax normaliser, row mean) are the GPU's fast fp32 division (<= 2 ulp; the
  interpreter divides exactly), far below the tolerances of every dtype. fp16/bf16
  dots round rotated q/k and p to the input dtype (fp32 accumulation); the bf16 error is
  within 2x of HF's own bf16 path (tests/test_vtu_bf16_emulation.py).
- Queries in merged-row order: a tile's positions are scattered (a DToMe group spans the
  image), so the causal bound of a tile is its largest position and every key tile above its
  smallest position is masked: up to ~2x the score work of position order when groups are
  spread over long spans (the price of re-merging in the epilogue instead of in memory).
- Every key tile is gathered and re-rotated by every query-tile program (rotated copies are
  never stored): about 6 fp32 FLOPs per key element per tile on CUDA cores; the rotated key
  tile and the epilogue scan are what bound BLOCK_M/BLOCK_N (see ``attention_config``).
- A non-finite V at a visible key turns the whole output row NaN (not only its column).
- Whole-row tiling serialises a long merged row: the one program that owns a row of L
  positions runs cdiv(L, BLOCK_S) steps while the programs of the tiles it covers exit at
  once (a flat image whose background is one merged row keeps one program busy longest).
- Offsets inside one (batch, head) slice, and within one image's output and carry buffer,
  are int32 (the launcher checks the spans < 2**31).
- Inference only (no backward).
"""

import triton
import triton.language as tl


@triton.jit
def _load_f32(ptr, mask, HAS_MASK: tl.constexpr):
    """Load (zeros where masked off) and upcast to fp32 right away (the interpreter mishandles bf16)."""
    if HAS_MASK:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x.to(tl.float32)


@triton.jit
def _load_rotated(
    x_base, rows, rows_ok, stride_xn, stride_xd,
    cos_base, sin_base, pos, pos_ok, stride_cn, stride_cd, stride_sn, stride_sd,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """Gather rows of x and rotate them at positions ``pos``; returns the two halves in fp32.

    rope(x, i) = x * cos[i] + rotate_half(x) * sin[i], rotate_half(x) = [-x2; x1], so
    out1 = x1 * cos1 - x2 * sin1 and out2 = x2 * cos2 + x1 * sin2 (cos/sin halves read apart,
    so cos tables whose halves differ are still honoured). MASK_ROWS=False: every row and
    position is known in range (loads then carry no row masks, which saves registers).
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, BLOCK_HALF)
    col_ok = offs_h < HALF
    if MASK_ROWS:
        x_mask = rows_ok[:, None] & col_ok[None, :]
        cs_mask = pos_ok[:, None] & col_ok[None, :]
    elif BLOCK_HALF != HALF:
        x_mask = col_ok[None, :]
        cs_mask = col_ok[None, :]
    else:  # rows known valid and no padded columns: unmasked loads
        x_mask = None
        cs_mask = None
    MASK_X: tl.constexpr = MASK_ROWS or BLOCK_HALF != HALF
    x_ptr = x_base + (rows[:, None] * stride_xn + offs_h[None, :] * stride_xd)
    x1 = _load_f32(x_ptr, x_mask, MASK_X)
    x2 = _load_f32(x_ptr + HALF * stride_xd, x_mask, MASK_X)
    c_ptr = cos_base + (pos[:, None] * stride_cn + offs_h[None, :] * stride_cd)
    s_ptr = sin_base + (pos[:, None] * stride_sn + offs_h[None, :] * stride_sd)
    c1 = _load_f32(c_ptr, cs_mask, MASK_X)
    c2 = _load_f32(c_ptr + HALF * stride_cd, cs_mask, MASK_X)
    s1 = _load_f32(s_ptr, cs_mask, MASK_X)
    s2 = _load_f32(s_ptr + HALF * stride_sd, cs_mask, MASK_X)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for hidden scores (exp2(NEG - m) == 0, and no inf - inf)


@triton.jit
def _seg_add(a, a_first, b, b_first):
    """Segmented sum: restart at every element flagged as the first of its run."""
    return tl.where(b_first != 0, b, a + b), tl.maximum(a_first, b_first)


@triton.jit
def _attn_inner(
    acc, l_i, m_i, bad, q1, q2, pos_m,
    k_base, v_base, cos_base, sin_base, map_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
    lo, hi, length, num_merged, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Stream key tiles [lo, hi) into the online-softmax state (acc, l_i, m_i, bad).

    MASKED=False: every key of the tiles is a valid position visible to every query of the
    program (no mask at all). MASKED=True: keys >= length and, when CAUSAL, keys after the
    query are hidden; hidden scores are where-selected away (a NaN/inf key never leaks) and
    V enters the P.V dot with non-finite entries zeroed, while ``bad`` records queries that
    see a non-finite V at a visible key (their output is NaN).
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < length
            rows_n = tl.load(map_base + offs_n * stride_mn, mask=n_ok, other=0)
        else:
            n_ok = offs_n < hi
            rows_n = tl.load(map_base + offs_n * stride_mn)
        # Clamp like the reference: a bad map entry reads row 0 or Nu - 1, never out of bounds.
        rows_n = tl.minimum(tl.maximum(rows_n, 0), num_merged - 1)
        k1, k2 = _load_rotated(
            k_base, rows_n, n_ok, stride_kn, stride_kd,
            cos_base, sin_base, offs_n, n_ok, stride_cn, stride_cd, stride_sn, stride_sd,
            HEAD_DIM, BLOCK_HALF, MASKED,
        )
        qk = tl.dot(q1, tl.trans(k1.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2.to(DOT_DTYPE)), qk, input_precision=INPUT_PRECISION)
        v_ptr = v_base + (rows_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        if MASKED:
            visible = n_ok[None, :] & (pos_m[:, None] >= 0)
            if CAUSAL:
                visible = visible & (pos_m[:, None] >= offs_n[None, :])
            qk = tl.where(visible, qk * qk_scale, NEG)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
            v = tl.load(v_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            v_finite = tl.abs(v) < float("inf")  # False for NaN and +-inf
            v_bad = tl.max(tl.where(v_finite, 0, 1), 1)
            bad = tl.maximum(bad, tl.max(tl.where(visible, v_bad[None, :], 0), 1))
            v = tl.where(v_finite, v, 0.0)
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
            if BLOCK_D != HEAD_DIM:
                v = tl.load(v_ptr, mask=d_ok[None, :], other=0.0).to(tl.float32)
            else:
                v = tl.load(v_ptr).to(tl.float32)
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i, bad


@triton.jit
def _row_at(order_base, map_base, stride_mn, slot, num_merged):
    """Merged row (clamped into [0, Nu) like the reference) of the position at ``slot`` of order."""
    row = tl.load(map_base + tl.load(order_base + slot) * stride_mn)
    return tl.minimum(tl.maximum(row, 0), num_merged - 1)


@triton.jit
def _attend_slots(
    Q, k_base, v_base, cos_base, sin_base, map_base, m_ok, head, pos_m, rows_m,
    stride_qh, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
    length, num_merged, num_full, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Attention output [BLOCK_M, BLOCK_D] fp32 of the tile's query rows (one full position
    ``pos_m`` and query head ``head`` per row; rows with m_ok False give garbage, never read)."""
    q_rows = head.to(tl.int64) * stride_qh + rows_m * stride_qn
    q1, q2 = _load_rotated(
        Q, q_rows, m_ok, 1, stride_qd,
        cos_base, sin_base, pos_m, m_ok, stride_cn, stride_cd, stride_sn, stride_sd,
        HEAD_DIM, BLOCK_HALF, True,
    )
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        first_pos = tl.min(tl.where(m_ok, pos_m, num_full), 0)
        split = (first_pos // BLOCK_N) * BLOCK_N  # keys < every query of the tile: no mask
        hi = tl.max(pos_m, 0) + 1
    else:
        split = (length // BLOCK_N) * BLOCK_N  # whole tiles of valid keys: no mask
        hi = length
    acc, l_i, m_i, bad = _attn_inner(
        acc, l_i, m_i, bad, q1, q2, pos_m, k_base, v_base, cos_base, sin_base, map_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
        0, split, length, num_merged, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, DOT_DTYPE, INPUT_PRECISION,
    )
    acc, l_i, m_i, bad = _attn_inner(
        acc, l_i, m_i, bad, q1, q2, pos_m, k_base, v_base, cos_base, sin_base, map_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
        split, hi, length, num_merged, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, DOT_DTYPE, INPUT_PRECISION,
    )
    o = acc / l_i[:, None]
    return tl.where(bad[:, None] != 0, float("nan"), o)


@triton.jit(do_not_specialize=["num_heads", "num_kv_groups", "num_merged", "num_full", "num_carry", "carry_by_row",
                               "qk_scale"])
def vtu_attention_fwd_kernel(
    Q, K, V, COS, SIN, POS_MAP, FULL_LEN, ORDER, ROW_START, ROW_COUNT, OUT, CARRY,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_cn, stride_cd,
    stride_sb, stride_sn, stride_sd,
    stride_mb, stride_mn,
    stride_outb, stride_outh, stride_outn, stride_outd,
    num_heads, num_kv_groups, num_merged, num_full, num_carry, carry_by_row, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_HEADS: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Attention of whole merged rows x GROUP_HEADS query heads of one KV head, re-merged in
    the epilogue: each merged row's mean is written by exactly one program.

    Grid: (num_tiles = cdiv(Nf, BLOCK_S), B * Hkv * cdiv(group, GROUP_HEADS)), BLOCK_S =
    BLOCK_M // GROUP_HEADS query slots (positions in merged-row order, ``ORDER``). The program
    of tile t owns the merged rows whose first slot lies in [t * BLOCK_S, (t + 1) * BLOCK_S)
    and walks their slots [a, e) (e may pass the tile's end) BLOCK_S at a time. Tile row m is
    head m // BLOCK_S of the chunk and slot m % BLOCK_S, so each K/V tile gathered and rotated
    once serves every head. A row still open at the end of a step carries its fp32 partial sum
    into the next step through CARRY [B, Hq, num_carry, D] (one entry per program and head:
    indexed by the program's first row when carry_by_row, else by its tile, so num_carry =
    min(Nu, num_tiles)). Rows no position maps to are left to ``vtu_zero_empty_rows_kernel``.
    qk_scale = scale * log2(e).
    """
    BLOCK_S: tl.constexpr = BLOCK_M // GROUP_HEADS
    tile = tl.program_id(0)
    pid = tl.program_id(1)
    num_chunks = tl.cdiv(num_kv_groups, GROUP_HEADS)
    num_kv_heads = num_heads // num_kv_groups
    b = (pid // (num_kv_heads * num_chunks)).to(tl.int64)
    kv_h = (pid // num_chunks) % num_kv_heads
    chunk = pid % num_chunks
    length = tl.minimum(tl.load(FULL_LEN + b), num_full)
    tile_start = tile * BLOCK_S
    if tile_start >= length:
        return
    map_base = POS_MAP + b * stride_mb
    order_base = ORDER + b * num_full
    rows_base = b * num_merged
    # The slots this program walks: from the first row starting in the tile (after the row
    # that straddles in from the previous tile, if any) to the end of the row holding the
    # tile's last slot. A row covering the whole tile leaves the program nothing to do.
    tile_end = tl.minimum(tile_start + BLOCK_S, length)
    row_in = _row_at(order_base, map_base, stride_mn, tile_start, num_merged)
    start_in = tl.load(ROW_START + rows_base + row_in)
    a = tl.where(start_in < tile_start, start_in + tl.load(ROW_COUNT + rows_base + row_in), tile_start)
    if a >= tile_end:
        return
    row_out = _row_at(order_base, map_base, stride_mn, tile_end - 1, num_merged)
    e = tl.load(ROW_START + rows_base + row_out) + tl.load(ROW_COUNT + rows_base + row_out)
    first_row = _row_at(order_base, map_base, stride_mn, a, num_merged)
    carry_idx = tl.where(carry_by_row != 0, first_row, tile)
    if DOT_FP32:
        DOT_DTYPE: tl.constexpr = tl.float32
    else:
        DOT_DTYPE: tl.constexpr = Q.dtype.element_ty

    offs_m = tl.arange(0, BLOCK_M)
    in_step = offs_m % BLOCK_S
    head_in_group = chunk * GROUP_HEADS + offs_m // BLOCK_S
    head = kv_h * num_kv_groups + head_in_group
    head_ok = head_in_group < num_kv_groups
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    cos_base = COS + b * stride_cb
    sin_base = SIN + b * stride_sb
    k_base = K + b * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kv_h.to(tl.int64) * stride_vh
    # int32 offsets from per-image bases (one image's output and carry are < 2**31 elements,
    # checked by the launcher): half the registers of 64-bit pointer tiles.
    carry_row = ((head * num_carry + carry_idx) * HEAD_DIM)[:, None] + offs_d[None, :]
    carry_ptrs = CARRY + b * num_heads * num_carry * HEAD_DIM + carry_row
    for s0 in range(a, e, BLOCK_S):
        slot = s0 + in_step
        m_ok = (slot < e) & head_ok
        pos_m = tl.load(order_base + slot, mask=m_ok, other=-1)
        pos_m = tl.where(m_ok, pos_m, -1)
        rows_m = tl.load(map_base + pos_m * stride_mn, mask=m_ok, other=0)
        rows_m = tl.minimum(tl.maximum(rows_m, 0), num_merged - 1)
        o = _attend_slots(
            Q + b * stride_qb, k_base, v_base, cos_base, sin_base, map_base, m_ok, head, pos_m, rows_m,
            stride_qh, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
            length, num_merged, num_full, qk_scale,
            HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, DOT_DTYPE, INPUT_PRECISION,
        )
        # Epilogue: slots are sorted by merged row, so each row is one run of consecutive
        # slots; the run continuing from the previous step starts with that step's carry.
        row_start = tl.load(ROW_START + rows_base + rows_m, mask=m_ok, other=0)
        row_end = row_start + tl.load(ROW_COUNT + rows_base + rows_m, mask=m_ok, other=1)
        carried = m_ok & (in_step == 0) & (row_start < s0)
        o += tl.load(carry_ptrs, mask=carried[:, None] & d_ok, other=0.0)
        tl.debug_barrier()  # every carry read before this step's carry is written
        first = (slot == row_start) | (in_step == 0)
        first_2d = tl.where(first[:, None] & (offs_d[None, :] >= 0), 1, 0).to(tl.int8)
        sums, _ = tl.associative_scan((o, first_2d), 0, _seg_add)
        done = m_ok & (slot == row_end - 1)  # the row's last slot: its sum is complete
        mean = sums / (row_end - row_start)[:, None].to(tl.float32)
        out_row = head * stride_outh + rows_m * stride_outn
        tl.store(OUT + b * stride_outb + (out_row[:, None] + offs_d[None, :] * stride_outd),
                 mean.to(OUT.dtype.element_ty), mask=done[:, None] & d_ok)
        open_row = m_ok & (in_step == BLOCK_S - 1) & (slot < row_end - 1)
        tl.store(carry_ptrs, sums, mask=open_row[:, None] & d_ok)
        tl.debug_barrier()  # the carry written before the next step reads it


@triton.jit(do_not_specialize=["num_merged", "num_full"])
def vtu_group_rows_kernel(
    POS_MAP, FULL_LEN, ROW_START, ROW_COUNT, ORDER,
    stride_mb, stride_mn, num_merged, num_full,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Stable counting sort of the valid positions of image b by merged row (no atomics).

    Grid: (cdiv(Nu, BLOCK_R), B). ROW_START, ROW_COUNT: [B, Nu] int32 contiguous; ORDER:
    [B, Nf] int32 contiguous, ORDER[b, ROW_START[b, r] + j] = j-th position (ascending) that
    maps to row r. Positions >= full_lengths[b] are skipped; map entries of valid positions
    outside [0, Nu) are clamped into it (as the reference does), so the rows' counts add up
    to the length and ORDER[b, :length] holds every valid position.
    """
    r0 = tl.program_id(0) * BLOCK_R
    b = tl.program_id(1).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_R)
    length = tl.minimum(tl.load(FULL_LEN + b), num_full)
    map_base = POS_MAP + b * stride_mb
    counts = tl.zeros([BLOCK_R], dtype=tl.int32)
    before = tl.zeros([BLOCK_P], dtype=tl.int32)  # valid positions mapping to rows < r0
    for p0 in range(0, length, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < length
        u = tl.load(map_base + offs_p * stride_mn, mask=p_ok, other=0)
        u = tl.where(p_ok, tl.minimum(tl.maximum(u, 0), num_merged - 1), -1)
        before += ((u >= 0) & (u < r0)).to(tl.int32)
        counts += tl.sum((u[None, :] == rows[:, None]).to(tl.int32), 1)
    starts = tl.sum(before, 0) + tl.cumsum(counts, 0) - counts
    row_ok = rows < num_merged
    tl.store(ROW_START + b * num_merged + rows, starts, mask=row_ok)
    tl.store(ROW_COUNT + b * num_merged + rows, counts, mask=row_ok)
    placed = tl.zeros([BLOCK_R], dtype=tl.int32)
    order_base = ORDER + b * num_full
    for p0 in range(0, length, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < length
        u = tl.load(map_base + offs_p * stride_mn, mask=p_ok, other=0)
        u = tl.where(p_ok, tl.minimum(tl.maximum(u, 0), num_merged - 1), -1)
        match = (u[None, :] == rows[:, None]).to(tl.int32)
        slot = starts[:, None] + placed[:, None] + tl.cumsum(match, 1) - 1
        tl.store(order_base + slot, offs_p[None, :] + 0 * match, mask=match != 0)
        placed += tl.sum(match, 1)


@triton.jit(do_not_specialize=["num_heads", "num_merged"])
def vtu_zero_empty_rows_kernel(
    ROW_COUNT, OUT,
    stride_outb, stride_outh, stride_outn, stride_outd,
    num_heads, num_merged,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT rows no valid position maps to (count 0), written as 0 for every head; the other
    rows are the attention kernel's. Grid: (cdiv(Nu, BLOCK_R), B, Hq)."""
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < num_merged
    count = tl.load(ROW_COUNT + b * num_merged + rows, mask=r_ok, other=1)
    offs_d = tl.arange(0, BLOCK_D)
    empty = r_ok & (count == 0)
    out_ptr = (OUT + b * stride_outb + h * stride_outh + rows[:, None].to(tl.int64) * stride_outn
               + offs_d[None, :] * stride_outd)
    tl.store(out_ptr, tl.zeros([BLOCK_R, BLOCK_D], dtype=OUT.dtype.element_ty),
             mask=empty[:, None] & (offs_d[None, :] < HEAD_DIM))
