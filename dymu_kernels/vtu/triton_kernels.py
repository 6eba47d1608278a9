"""Triton kernels of VTU attention (README, Semantics: VTU); the launcher is ``vtu/triton.py``.

Three kernels, in the order they run:

1. ``vtu_attention_fwd_kernel``: FlashAttention-2-style forward over the *full* positions.
   One program = BLOCK_M full query positions of one (batch, query head). Query and key rows
   are gathered through ``pos_map`` and rotated (RoPE) at their own positions in registers,
   in fp32; online softmax in fp32 with exp2. Writes the per-position output
   o [B, Nf, Hq, D] fp32 (the size of SDPA's own output; nothing full-length else is stored).
2. ``vtu_group_rows_kernel``: a stable counting sort of the valid positions by merged row,
   without atomics or a host sync: for BLOCK_R merged rows it scans the map twice (count,
   then place with an in-tile cumsum). Output: row_start/row_count [B, Nu] and the positions
   grouped by row in increasing order, order [B, Nf]. Work O(Nu * Nf) compares per image,
   vectorised BLOCK_R x BLOCK_P (negligible next to the N_full^2 * D attention).
3. ``vtu_merge_rows_kernel``: for each (merged row, batch, block of head x dim columns) the
   mean of o over the row's positions, summed in position order (bit-identical run to run);
   rows with no valid position are written as 0.

Limitations:
- Head dim D must be even and <= 128; the two RoPE halves are padded separately to a power
  of two >= 16 (D = 72/80/96 use 2 x 64 columns, D <= 32 use 2 x 16).
- fp32 inputs use IEEE fp32 dots (no TF32): exact but slow on tensor-core GPUs.
- Every query-tile program gathers and re-rotates every key tile it reads (rotated copies are
  never stored): about 6 fp32 FLOPs per key element per tile, on CUDA cores, next to the
  tensor-core dots; with GQA the query heads of one group each redo it (packing a group into
  one program would share it: not done yet). The rotated key tile lives in registers, which
  is what limits BLOCK_N (see ``attention_config``).
- Offsets inside one (batch, head) slice are int32 (the launcher checks the span < 2**31).
- Map entries of valid positions outside [0, Nu) are not an error here (the op layer checks
  them when validation is on); the kernels load zeros for them (or, in unmasked key tiles,
  clamp them into [0, Nu)) and never read or write out of bounds; such a position belongs
  to no merged row.
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


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q1, q2, offs_m,
    k_base, v_base, cos_base, sin_base, map_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
    lo, hi, num_merged, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Stream key tiles [lo, hi) into the online-softmax state (acc, l_i, m_i).

    MASKED=False is for tiles entirely below the causal diagonal and entirely < hi: no score
    mask at all. MASKED=True masks keys >= hi (hi = the image's length there) and, when
    CAUSAL, keys after the query.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < hi
            rows_n = tl.load(map_base + offs_n * stride_mn, mask=n_ok, other=0)
            rows_ok = n_ok & (rows_n >= 0) & (rows_n < num_merged)
        else:  # valid positions: clamping only guards against a bad map (never out of bounds)
            n_ok = offs_n < hi
            rows_n = tl.load(map_base + offs_n * stride_mn)
            rows_n = tl.minimum(tl.maximum(rows_n, 0), num_merged - 1)
            rows_ok = n_ok
        k1, k2 = _load_rotated(
            k_base, rows_n, rows_ok, stride_kn, stride_kd,
            cos_base, sin_base, offs_n, n_ok, stride_cn, stride_cd, stride_sn, stride_sd,
            HEAD_DIM, BLOCK_HALF, MASKED,
        )
        qk = tl.dot(q1, tl.trans(k1.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2.to(DOT_DTYPE)), qk, input_precision=INPUT_PRECISION)
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
            qk = qk * qk_scale + tl.where(visible, 0.0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = v_base + (rows_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        if MASKED:
            v = tl.load(v_ptr, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptr, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptr)
        v = v.to(DOT_DTYPE)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(
    do_not_specialize=[
        "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb", "stride_vh",
        "stride_cb", "stride_sb", "stride_mb", "stride_ob", "stride_oh",
        "num_heads", "num_kv_groups", "num_merged", "num_full", "qk_scale",
    ]
)
def vtu_attention_fwd_kernel(
    Q, K, V, COS, SIN, POS_MAP, FULL_LEN, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_cb, stride_cn, stride_cd,
    stride_sb, stride_sn, stride_sd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on,
    num_heads, num_kv_groups, num_merged, num_full, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """o[b, h, i] = softmax-attention output of full position i (rows >= full_lengths untouched).

    Grid: (cdiv(Nf, BLOCK_M), B * Hq). BLOCK_M % BLOCK_N == 0. qk_scale = scale * log2(e).
    DOT_FP32: dot operands in fp32 (fp32 inputs, and the interpreter, which has no bf16 dot);
    otherwise in the input dtype with fp32 accumulation.
    """
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    kv_h = h // num_kv_groups
    length = tl.minimum(tl.load(FULL_LEN + b), num_full)
    if start_m >= length:
        return
    if DOT_FP32:
        DOT_DTYPE: tl.constexpr = tl.float32
    else:
        DOT_DTYPE: tl.constexpr = Q.dtype.element_ty

    map_base = POS_MAP + b * stride_mb
    cos_base = COS + b * stride_cb
    sin_base = SIN + b * stride_sb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    rows_m = tl.load(map_base + offs_m * stride_mn, mask=m_ok, other=0)
    rows_ok = m_ok & (rows_m >= 0) & (rows_m < num_merged)
    q1, q2 = _load_rotated(
        Q + b * stride_qb + h.to(tl.int64) * stride_qh, rows_m, rows_ok, stride_qn, stride_qd,
        cos_base, sin_base, offs_m, m_ok, stride_cn, stride_cd, stride_sn, stride_sd,
        HEAD_DIM, BLOCK_HALF, True,
    )
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kv_h.to(tl.int64) * stride_vh
    if CAUSAL:
        split = start_m  # key tiles wholly below the diagonal: no mask
        hi = tl.minimum(start_m + BLOCK_M, length)
    else:
        split = (length // BLOCK_N) * BLOCK_N  # whole tiles of valid keys: no mask
        hi = length
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q1, q2, offs_m, k_base, v_base, cos_base, sin_base, map_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
        0, split, num_merged, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, DOT_DTYPE, INPUT_PRECISION,
    )
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q1, q2, offs_m, k_base, v_base, cos_base, sin_base, map_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_cn, stride_cd, stride_sn, stride_sd, stride_mn,
        split, hi, num_merged, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, DOT_DTYPE, INPUT_PRECISION,
    )
    acc = acc / l_i[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    o_ptr = O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptr, acc, mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=["stride_mb", "num_merged", "num_full"])
def vtu_group_rows_kernel(
    POS_MAP, FULL_LEN, ROW_START, ROW_COUNT, ORDER,
    stride_mb, stride_mn, num_merged, num_full,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Stable counting sort of the valid positions of image b by merged row (no atomics).

    Grid: (cdiv(Nu, BLOCK_R), B). ROW_START, ROW_COUNT: [B, Nu] int32 contiguous; ORDER:
    [B, Nf] int32 contiguous, ORDER[b, ROW_START[b, r] + j] = j-th position (ascending) that
    maps to row r. Positions >= full_lengths[b] and map entries outside [0, Nu) are skipped.
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
        u = tl.load(map_base + offs_p * stride_mn, mask=offs_p < length, other=-1)
        u = tl.where((u >= 0) & (u < num_merged), u, -1)
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
        u = tl.load(map_base + offs_p * stride_mn, mask=offs_p < length, other=-1)
        match = (u[None, :] == rows[:, None]).to(tl.int32)
        slot = starts[:, None] + placed[:, None] + tl.cumsum(match, 1) - 1
        tl.store(order_base + slot, offs_p[None, :] + 0 * match, mask=match != 0)
        placed += tl.sum(match, 1)


@triton.jit(do_not_specialize=["stride_ob", "stride_outb", "stride_outh", "num_heads", "num_merged", "num_full"])
def vtu_merge_rows_kernel(
    O, ROW_START, ROW_COUNT, ORDER, OUT,
    stride_ob, stride_on,
    stride_outb, stride_outh, stride_outn, stride_outd,
    num_heads, num_merged, num_full,
    HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """OUT[b, :, r] = mean of O[b, i] over the positions i of row r, in position order; 0 if none.

    Grid: (Nu, B, cdiv(Hq * D, BLOCK_C)). O: [B, Nf, Hq, D] fp32 with (Hq, D) contiguous, so a
    position's outputs of all heads are one row of Hq * D columns; OUT [B, Hq, Nu, D] in the
    output dtype, any strides.
    """
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_heads * HEAD_DIM
    start = tl.load(ROW_START + b * num_merged + r)
    count = tl.load(ROW_COUNT + b * num_merged + r)
    o_base = O + b * stride_ob
    order_base = ORDER + b * num_full + start
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j0 in range(0, count, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < count
        pos = tl.load(order_base + offs_j, mask=j_ok, other=0)
        x = tl.load(o_base + pos[:, None].to(tl.int64) * stride_on + offs_c[None, :],
                    mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(x, 0)
    mean = acc / tl.maximum(count, 1).to(tl.float32)
    head = (offs_c // HEAD_DIM).to(tl.int64)
    col = offs_c % HEAD_DIM
    out_ptr = OUT + b * stride_outb + head * stride_outh + r.to(tl.int64) * stride_outn + col * stride_outd
    tl.store(out_ptr, mean.to(OUT.dtype.element_ty), mask=c_ok)
