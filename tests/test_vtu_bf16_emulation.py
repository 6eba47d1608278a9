"""bf16 numerics of the Triton VTU kernel on a GPU, emulated in PyTorch on the CPU.

Under TRITON_INTERPRET=1 the kernel takes its fp32 dot path (the interpreter has no bf16
dot), so the GPU's roundings are never exercised by the interpreter tests. This file
replays them: q and k rotated in fp32 (cos/sin upcast), rounded to bf16 for the QK^T dot,
fp32 scores and online softmax over key tiles of BLOCK_N, p rounded to bf16 for the P.V
dot with fp32 accumulation, fp32 re-merge mean, bf16 output. The flash-attention rule is
applied against HF's own bf16 path on the same input (rotate in bf16 with bf16 cos/sin, as
apply_rotary_pos_emb does, then SDPA in bf16, then the segment mean): the kernel's error vs
the float64 oracle must be at most 2x that path's, plus a small floor. The README states
the resulting bf16 tolerance.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import max_err, rope_tables
from oracle import vtu_oracle

LOG2_E = 1.0 / math.log(2.0)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def segment_mean_bf16(o, index, nu):
    """fp32 mean of the per-position outputs o [H, Nf, D] over each merged row, to bf16."""
    sums = torch.zeros(o.shape[0], nu, o.shape[-1], dtype=torch.float32).index_add_(1, index, o.float())
    counts = torch.bincount(index, minlength=nu).clamp_min(1).float()
    return (sums / counts[:, None]).to(torch.bfloat16)


def kernel_emulation(q, k, v, cos, sin, index, group, block_n=32):
    """The GPU kernel's bf16 arithmetic for one image (q [Hq, Nu, D], k/v [Hkv, Nu, D])."""
    nf, d = index.numel(), q.shape[-1]
    qr = rotate(q[:, index].float(), cos.float(), sin.float()).bfloat16().float()
    kr = rotate(k[:, index].float(), cos.float(), sin.float()).bfloat16().float().repeat_interleave(group, 0)
    vf = v[:, index].float().repeat_interleave(group, 0)
    qk_scale = d**-0.5 * LOG2_E
    m = torch.full((q.shape[0], nf), -math.inf)
    l_sum = torch.zeros(q.shape[0], nf)
    acc = torch.zeros(q.shape[0], nf, d)
    causal = torch.ones(nf, nf, dtype=torch.bool).tril()
    for start in range(0, nf, block_n):
        cols = slice(start, min(start + block_n, nf))
        s = (qr @ kr[:, cols].transpose(-1, -2)) * qk_scale
        s = torch.where(causal[:, cols], s, -1.0e30)
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.bfloat16().float() @ vf[:, cols]
        m = m_new
    return segment_mean_bf16(acc / l_sum[..., None], index, q.shape[1])


def hf_bf16_path(q, k, v, cos, sin, index, group):
    """Expand, rotate in bf16 (cos/sin in bf16, as HF's rotary embedding returns them), SDPA in bf16."""
    cb, sb = cos.bfloat16(), sin.bfloat16()
    qr = rotate(q[:, index], cb, sb)
    kr = rotate(k[:, index], cb, sb).repeat_interleave(group, 0)
    vf = v[:, index].repeat_interleave(group, 0)
    o = F.scaled_dot_product_attention(qr[None], kr[None], vf[None], is_causal=True)[0]
    return segment_mean_bf16(o, index, q.shape[1])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("logit_std", [1.0, 4.0, 9.0])
def test_bf16_kernel_rounding_within_2x_of_hf_bf16(d, logit_std):
    hq, hkv, nu, nf = 4, 2, 24, 160
    g = torch.Generator().manual_seed(d + int(logit_std))
    amp = math.sqrt(logit_std)  # q.k * D**-0.5 then has standard deviation ~ logit_std
    q = (torch.randn(1, hq, nu, d, generator=g) * amp).bfloat16()
    k = (torch.randn(1, hkv, nu, d, generator=g) * amp).bfloat16()
    v = torch.randn(1, hkv, nu, d, generator=g).bfloat16()
    index = torch.cat([torch.arange(nu), torch.randint(0, nu, (nf - nu,), generator=g)])
    index = index[torch.randperm(nf, generator=g)]
    cos, sin = rope_tables(nf, d)  # fp32, what the model layer passes
    oracle = vtu_oracle(q, k, v, cos, sin, index[None].to(torch.int32))[0]
    kernel = kernel_emulation(q[0], k[0], v[0], cos, sin, index, hq // hkv)
    hf = hf_bf16_path(q[0], k[0], v[0], cos, sin, index, hq // hkv)
    err, base = max_err(kernel, oracle), max_err(hf, oracle)
    assert err <= 2 * base + 2e-3, f"kernel bf16 error {err:.3e} vs HF bf16 path {base:.3e}"
    # Both are bf16 outputs: never better than rounding the oracle itself.
    assert err >= max_err(oracle.to(torch.bfloat16), oracle) * 0.5
