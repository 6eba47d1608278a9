"""Native (csrc, C++/OpenMP) backend of the vtu ops: bindings to ``torch.ops.dymu.native_*``.

``vtu_attention`` runs ``dymu::native_vtu_attention`` (csrc/vtu_cpu.cpp) on CPU tensors: a
blocked flash-attention forward in fp32 over the virtually unmerged sequence, fused with the
gather, RoPE and re-merge: queries are processed in merged-row order, K/V tiles gathered and
rotated on the fly once per GQA group, each merged row's mean formed in the epilogue. It
receives the arguments ``dymu_kernels.api.vtu_attention`` has validated and normalised (the
same as ``reference.vtu_attention``).

Memory beyond the inputs and the output: int32 [B, Nf] (positions grouped by merged row) and
[B, Nu + 1], plus one fp32 workspace of about (2 * Hq/Hkv + 2) * 64 * D floats per thread; nothing
of full length. Keys hidden from a query (causal, or >= full_lengths) are skipped, so NaN/inf
there cannot reach its output.

Limitations: CPU tensors only (no CUDA kernel yet); inference only.
"""

import torch

from .. import _alloc
from .. import _C  # noqa: F401  (loads the shared object, which registers torch.ops.dymu.*)

SUPPORTED = frozenset({"vtu_attention"})


@torch.library.register_fake("dymu::native_vtu_attention")
def _native_vtu_attention_fake(q, k, v, cos, sin, pos_map, full_lengths, causal, scale, out):
    return None


def vtu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    full_lengths: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Re-merged attention of the virtually unmerged sequence (README, Semantics: VTU).

    Args:
        q: [B, Hq, Nu, D] merged queries, RoPE not applied; fp16/bf16/fp32, any strides.
        k, v: [B, Hkv, Nu, D] in q.dtype, Hq % Hkv == 0; any strides.
        cos, sin: [B, Nf', D] float (a stride-0 broadcast view over B is read as is), Nf' >= Nf.
        pos_map: [B, Nf] int32, merged row of every full position (ignored at positions
            >= full_lengths, where it may be -1).
        full_lengths: [B] int32 in [0, Nf].
        causal: key j visible to query i iff j <= i.
        scale: softmax scale.

    Returns:
        out [B, Hq, Nu, D] in q.dtype (contiguous); merged rows no valid position maps to are 0.
        Computed in fp32, deterministic (bit-identical across runs and thread counts).
    """
    out = _alloc.empty(q.shape, q.dtype, q.device)
    torch.ops.dymu.native_vtu_attention(q, k, v, cos, sin, pos_map, full_lengths, bool(causal), float(scale), out)
    return out
