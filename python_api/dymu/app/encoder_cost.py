"""FLOP model of a DToMe encoder run: what the rows each block really processes cost.

Used by ``dymu demo`` and ``benchmarks/test_bench_varlen.py`` to put a measured encoder
speedup beside its FLOP-ideal (projections, attention and MLP FLOPs of the rows per block).
"""

import torch


def block_flops(rows_in: torch.Tensor, rows_out: torch.Tensor, dim: int, mlp_dim: int) -> float:
    """FLOPs of one ViT block over a batch: q/k/v/out projections and attention on the rows
    entering it (per image, [B] counts), the MLP on the rows left after its merge."""
    rows_in, rows_out = rows_in.double(), rows_out.double()
    proj = 2 * 4 * dim * dim * rows_in.sum()
    attn = 2 * 2 * dim * (rows_in**2).sum()
    mlp = 2 * 2 * dim * mlp_dim * rows_out.sum()
    return float(proj + attn + mlp)


def flop_ideal_speedup(layer_lengths: torch.Tensor, n0: int, dim: int, mlp_dim: int) -> float:
    """Unmerged FLOPs over merged FLOPs. layer_lengths: [L, B] rows per image after each block
    (``DToMeEncoderOutput.layer_lengths``); n0: rows entering the first block."""
    bsz = layer_lengths.shape[1]
    full = torch.full((bsz,), n0)
    unmerged = sum(block_flops(full, full, dim, mlp_dim) for _ in range(layer_lengths.shape[0]))
    merged, rows = 0.0, full
    for after in layer_lengths:
        merged += block_flops(rows, after, dim, mlp_dim)
        rows = after
    return unmerged / merged
