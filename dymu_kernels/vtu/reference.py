"""Reference (pure PyTorch) VTU attention: the executable specification of README, Semantics: VTU.

Arguments are validated and normalised by ``dymu_kernels.api``: cos/sin are [B, Nf', D] (a
broadcast view when the caller gave [Nf', D]), pos_map is int32 [B, Nf], full_lengths int32 [B].
All math is fp32. Memory is that of SDPA on the expanded sequence (this is the baseline the
fused kernels remove, not a kernel).
"""

import torch
import torch.nn.functional as F

SUPPORTED = frozenset({"vtu_attention"})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x[D/2:] ; x[:D/2]] along the last dim (HF's rotate_half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x, i) = x * cos[i] + rotate_half(x) * sin[i], elementwise over all D columns."""
    return x * cos + rotate_half(x) * sin


def expand_to_full(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, Nu, D] merged rows -> [B, H, Nf, D] fp32 full rows; index [B, Nf] long."""
    bsz, heads, _, dim = t.shape
    return t.float().gather(2, index[:, None, :, None].expand(bsz, heads, index.shape[1], dim))


def segment_mean(o: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean of the full rows o [B, H, Nf, D] over each merged row; rows no one maps to -> 0."""
    bsz, heads, _, dim = o.shape
    o = torch.where(valid[:, None, :, None], o, 0.0)
    sums = o.new_zeros(bsz, heads, num_rows, dim)
    sums.scatter_add_(2, index[:, None, :, None].expand_as(o), o)
    counts = o.new_zeros(bsz, num_rows).scatter_add_(1, index, valid.float())
    return torch.where(counts[:, None, :, None] > 0, sums / counts.clamp_min(1.0)[:, None, :, None], 0.0)


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
    """Re-merged attention of the virtually unmerged sequence; see ``dk.vtu_attention``."""
    num_merged = q.shape[2]
    num_full = pos_map.shape[1]
    valid = torch.arange(num_full, device=q.device) < full_lengths[:, None]  # [B, Nf]
    index = torch.where(valid, pos_map, 0).long().clamp(0, max(num_merged - 1, 0))
    cos_full = cos[:, None, :num_full].float()
    sin_full = sin[:, None, :num_full].float()
    qf = apply_rope(expand_to_full(q, index), cos_full, sin_full)
    kf = apply_rope(expand_to_full(k, index), cos_full, sin_full)
    vf = expand_to_full(v, index)
    # Positions >= full_lengths hold anything (NaN in cos/sin or -1 in the map): zero them.
    kf = torch.where(valid[:, None, :, None], kf, 0.0)
    vf = torch.where(valid[:, None, :, None], vf, 0.0)
    allowed = valid[:, None, None, :]  # keys
    if causal:
        allowed = allowed & torch.ones(num_full, num_full, dtype=torch.bool, device=q.device).tril()
    allowed = allowed | ~valid[:, None, :, None]  # padded queries see everything, then are dropped
    o = F.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return segment_mean(o, index, valid, num_merged).to(q.dtype)
