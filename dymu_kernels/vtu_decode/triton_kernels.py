"""Triton kernels of decode attention over a merged KV cache (issue 11); launcher in ``triton.py``.

Flash-decoding in two kernels:

1. ``vtu_decode_split_kernel``: one program per (split of positions, query). The query row is
   rotated at its position; the program walks its split of cached positions in BLOCK_N tiles,
   gathers each position's K/V row through ``pos_map``, rotates K at the position in registers
   (fp32), and keeps an online softmax (exp2, scale folded in). It writes the split's partial
   (max, sum, unnormalised output) in fp32: [queries, splits] and [queries, splits, D].
2. ``vtu_decode_combine_kernel``: one program per query combines its splits in a fixed order
   (max, then the rescaled sums): deterministic, no atomics. A query that sees no key gets 0.

Masking: positions hidden from the query (j > p_t or j >= full_lengths) are masked in every
load (nothing is read for them) and their logits are selected to -inf, so NaN/inf there cannot
leak; values at visible positions propagate. Map entries of visible positions are clamped into
[0, R). Nothing full-length is written: the partials are O(queries * splits * D).

Limitations: one query per program (the query heads of a GQA group each gather the group's
rows: packing them is future work); D even, <= 128, each RoPE half padded to a power of two
>= 8 in registers; int32 offsets inside one (batch, head) slice; inference only.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_heads", "num_kv_groups", "num_queries", "num_rows", "num_pos", "num_splits", "qk_scale"])
def vtu_decode_split_kernel(
    Q, K, V, COS, SIN, POS_MAP, QPOS, FULL_LEN, M_OUT, L_OUT, ACC_OUT,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kr, stride_kd,
    stride_vb, stride_vh, stride_vr, stride_vd,
    stride_cb, stride_cp, stride_cd,
    stride_sb, stride_sp, stride_sd,
    stride_mb, stride_mp,
    stride_pb, stride_pt,
    num_heads, num_kv_groups, num_queries, num_rows, num_pos, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    split = tl.program_id(0)
    query = tl.program_id(1)  # flat over (b, h, t)
    t = query % num_queries
    bh = query // num_queries
    h = bh % num_heads
    b = bh // num_heads
    g = h // num_kv_groups
    half = HEAD_DIM // 2

    length = tl.load(FULL_LEN + b)
    length = tl.minimum(tl.maximum(length, 0), num_pos)
    p_t = tl.load(QPOS + b.to(tl.int64) * stride_pb + t * stride_pt)
    limit = tl.minimum(length, p_t + 1)  # visible positions [0, limit)

    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half
    # the query, rotated at p_t, scale * log2(e) folded in
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + t * stride_qt
    q1 = tl.load(q_base + d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_base + (d + half) * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    c_base = COS + b.to(tl.int64) * stride_cb
    s_base = SIN + b.to(tl.int64) * stride_sb
    cq1 = tl.load(c_base + p_t * stride_cp + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    cq2 = tl.load(c_base + p_t * stride_cp + (d + half) * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    sq1 = tl.load(s_base + p_t * stride_sp + d * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    sq2 = tl.load(s_base + p_t * stride_sp + (d + half) * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    qr1 = (q1 * cq1 - q2 * sq1) * qk_scale
    qr2 = (q2 * cq2 + q1 * sq2) * qk_scale

    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    map_base = POS_MAP + b.to(tl.int64) * stride_mb

    m_i = float("-inf")
    l_i = 0.0
    acc1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    start = split * SPLIT
    for off in range(0, SPLIT, BLOCK_N):
        j = start + off + tl.arange(0, BLOCK_N)
        vis = j < limit
        rows = tl.load(map_base + j * stride_mp, mask=vis, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), num_rows - 1)
        m2 = vis[:, None] & d_ok[None, :]
        kp = k_base + rows[:, None] * stride_kr
        k1 = tl.load(kp + d[None, :] * stride_kd, mask=m2, other=0.0).to(tl.float32)
        k2 = tl.load(kp + (d[None, :] + half) * stride_kd, mask=m2, other=0.0).to(tl.float32)
        cp = c_base + j[:, None] * stride_cp
        sp = s_base + j[:, None] * stride_sp
        c1 = tl.load(cp + d[None, :] * stride_cd, mask=m2, other=0.0).to(tl.float32)
        c2 = tl.load(cp + (d[None, :] + half) * stride_cd, mask=m2, other=0.0).to(tl.float32)
        s1 = tl.load(sp + d[None, :] * stride_sd, mask=m2, other=0.0).to(tl.float32)
        s2 = tl.load(sp + (d[None, :] + half) * stride_sd, mask=m2, other=0.0).to(tl.float32)
        kr1 = k1 * c1 - k2 * s1
        kr2 = k2 * c2 + k1 * s2
        logits = tl.sum(kr1 * qr1[None, :], axis=1) + tl.sum(kr2 * qr2[None, :], axis=1)
        logits = tl.where(vis, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(vis, tl.exp2(logits - m_safe), 0.0)
        alpha = tl.exp2(m_i - m_safe)
        vp = v_base + rows[:, None] * stride_vr
        v1 = tl.load(vp + d[None, :] * stride_vd, mask=m2, other=0.0).to(tl.float32)
        v2 = tl.load(vp + (d[None, :] + half) * stride_vd, mask=m2, other=0.0).to(tl.float32)
        acc1 = acc1 * alpha + tl.sum(tl.where(vis[:, None], p[:, None] * v1, 0.0), axis=0)
        acc2 = acc2 * alpha + tl.sum(tl.where(vis[:, None], p[:, None] * v2, 0.0), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    slot = query.to(tl.int64) * num_splits + split
    tl.store(M_OUT + slot, m_i)
    tl.store(L_OUT + slot, l_i)
    acc_base = ACC_OUT + slot * (2 * BLOCK_HALF)
    tl.store(acc_base + d, acc1)
    tl.store(acc_base + BLOCK_HALF + d, acc2)


@triton.jit(do_not_specialize=["num_heads", "num_queries", "num_splits"])
def vtu_decode_combine_kernel(
    M_IN, L_IN, ACC_IN, OUT,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_heads, num_queries, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
):
    query = tl.program_id(0)
    t = query % num_queries
    bh = query // num_queries
    h = bh % num_heads
    b = bh // num_heads
    half = HEAD_DIM // 2
    base = query.to(tl.int64) * num_splits
    s_idx = tl.arange(0, BLOCK_S)
    m = float("-inf")
    for s0 in range(0, num_splits, BLOCK_S):
        ok = s0 + s_idx < num_splits
        m = tl.maximum(m, tl.max(tl.load(M_IN + base + s0 + s_idx, mask=ok, other=float("-inf")), axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    d = tl.arange(0, BLOCK_HALF)
    den = 0.0
    acc1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = s0 + s_idx < num_splits
        ms = tl.load(M_IN + base + s0 + s_idx, mask=ok, other=float("-inf"))
        ls = tl.load(L_IN + base + s0 + s_idx, mask=ok, other=0.0)
        w = tl.where(ms == float("-inf"), 0.0, tl.exp2(ms - m_safe))  # empty splits weigh 0
        den += tl.sum(w * ls, axis=0)
        ap = ACC_IN + (base + s0 + s_idx)[:, None] * (2 * BLOCK_HALF)
        a1 = tl.load(ap + d[None, :], mask=ok[:, None], other=0.0)
        a2 = tl.load(ap + BLOCK_HALF + d[None, :], mask=ok[:, None], other=0.0)
        has = ok & (ms != float("-inf"))
        acc1 += tl.sum(tl.where(has[:, None], w[:, None] * a1, 0.0), axis=0)
        acc2 += tl.sum(tl.where(has[:, None], w[:, None] * a2, 0.0), axis=0)
    seen = m != float("-inf")
    inv = tl.where(seen, 1.0 / tl.where(seen, den, 1.0), 0.0)
    o1 = tl.where(seen, acc1 * inv, 0.0)
    o2 = tl.where(seen, acc2 * inv, 0.0)
    d_ok = d < half
    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t * stride_ot
    tl.store(o_base + d * stride_od, o1.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(o_base + (d + half) * stride_od, o2.to(OUT.dtype.element_ty), mask=d_ok)
