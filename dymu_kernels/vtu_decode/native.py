"""Native (csrc, C++/OpenMP) backend of the vtu_decode op: ``torch.ops.dymu.native_vtu_decode_attention``.

The kernel (csrc/vtu_decode_cpu.cpp) works per (batch, kv head, block of queries): every merged
K row is read once per block and turned into RoPE coefficient vectors, so the logit of a cached
position costs one D-long multiply-add against its cos/sin row; softmax weights are summed per
row, and every V row is read once per block. With >= 4 queries per kv head (GQA) it instead
rotates each position's key once and dots it with all of them. No full-length K/V buffer is built.

Limitations: CPU tensors only (no CUDA kernel); cos/sin are converted to fp32 here (a no-op for
the fp32 tables models produce); inference only.
"""

import torch

from .. import _alloc
from .. import _C  # noqa: F401  (loads the shared object, which registers torch.ops.dymu.*)

SUPPORTED = frozenset({"vtu_decode_attention"})


@torch.library.register_fake("dymu::native_vtu_decode_attention")
def _native_vtu_decode_attention_fake(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, scale, out):
    return None


def vtu_decode_attention(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    q_positions: torch.Tensor,
    full_lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a merged cache (see ``dk.vtu_decode_attention``).

    Args (normalised by the api): q [B, Hq, Tq, D]; k_rows, v_rows [B, Hkv, R, D] in q.dtype (any
    strides); cos, sin [B, P', D] float (stride-0 batch views are read as is); pos_map [B, P]
    int32; q_positions [B, Tq] int32; full_lengths [B] int32; scale float.

    Returns:
        out [B, Hq, Tq, D] in q.dtype (contiguous), fp32 math, deterministic.
    """
    out = _alloc.empty(q.shape, q.dtype, q.device)
    cos, sin = cos.float(), sin.float()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    torch.ops.dymu.native_vtu_decode_attention(
        q, k_rows, v_rows, cos, sin, pos_map.contiguous(), q_positions.contiguous(), full_lengths.contiguous(), float(scale), out
    )
    return out
