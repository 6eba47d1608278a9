"""Triton kernels of the packed varlen ops: FlashAttention-2-style block-diagonal attention
with the log-size key bias, and zeroing of the rows past the packed total.

Grid of the attention: (query blocks of the longest possible image, B, H). A program reads its
image's offsets from cu_seqlens and exits at once when its query block starts past the image's
length; otherwise it streams the image's keys in BLOCK_N tiles with an online softmax (exp2,
scale folded in by log2 e), adding log2(size_j) per key (read per key tile, never a matrix; a
key of size 0 is masked). fp32 accumulation; fp32 inputs use IEEE fp32 dots. With DOT_INPUT
(fp16/bf16 on a GPU) the dots take the input dtype with fp32 accumulation; otherwise every tile
is upcast right after its load (the interpreter does bf16 arithmetic on raw bits).
Deterministic: no atomics, a fixed key order.
"""

import triton
import triton.language as tl


@triton.jit
def varlen_attention_fwd_kernel(
    Q, K, V, SIZE, CU, O,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_INPUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + b)
    n = tl.load(CU + b + 1) - start
    if pid_m * BLOCK_M >= n:  # this query block lies past the image: nothing to do
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < HEAD_DIM
    rows_m = (start + offs_m).to(tl.int64)
    q = tl.load(Q + rows_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if not DOT_INPUT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        rows_n = (start + offs_n).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + rows_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if not DOT_INPUT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        size = tl.load(SIZE + start + offs_n, mask=mask_n, other=0.0)
        bias = tl.where(size > 0.0, tl.log2(tl.maximum(size, 1e-30)), float("-inf"))
        s = s + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + rows_n[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_INPUT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    out = tl.where(l_i[:, None] > 0.0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(O + rows_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["num_rows", "row_width"])
def zero_tail_rows_kernel(OUT, CU, num_batch, num_rows, row_width, BLOCK: tl.constexpr):
    """Zero elements of rows >= cu_seqlens[B] of a contiguous [T, row_width] buffer."""
    pid = tl.program_id(0)
    total = tl.load(CU + num_batch)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = offs // row_width
    mask = (row >= total) & (row < num_rows)
    tl.store(OUT + offs, tl.zeros([BLOCK], dtype=tl.float32).to(OUT.dtype.element_ty), mask=mask)
