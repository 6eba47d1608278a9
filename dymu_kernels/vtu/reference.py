"""Reference (pure PyTorch) VTU attention: the executable specification of README, Semantics: VTU.

Arguments are validated and normalised by ``dymu_kernels.api``: cos/sin are [B, Nf', D] (a
broadcast view when the caller gave [Nf', D]), pos_map is int32 [B, Nf], full_lengths int32 [B].
All math is fp32. Memory is that of plain (math) attention on the expanded sequence,
O(B * Hq * Nf^2) for the scores (this is the baseline the fused kernels remove, not a kernel).
Masking rule (README, Semantics): a K/V value at a position hidden from a query (causal, or
>= full_lengths) never reaches that query's output, NaN/inf included; non-finite values at
visible keys propagate.
"""

import torch

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
    groups = q.shape[1] // k.shape[1]
    qf = apply_rope(expand_to_full(q, index), cos_full, sin_full)
    kf = apply_rope(expand_to_full(k, index), cos_full, sin_full).repeat_interleave(groups, dim=1)
    vf = expand_to_full(v, index).repeat_interleave(groups, dim=1)
    # Masking rule: a key hidden from a query (causal, or >= full_lengths) never affects it,
    # whatever it holds (NaN/inf included): select, never multiply by 0.
    allowed = valid[:, None, None, :]  # [B, 1, 1, Nf] keys
    if causal:
        allowed = allowed & torch.ones(num_full, num_full, dtype=torch.bool, device=q.device).tril()
    allowed = allowed | ~valid[:, None, :, None]  # padded queries see everything, then are dropped
    allowed = allowed.expand(-1, 1, num_full, num_full)
    logits = torch.where(allowed, (qf @ kf.transpose(-1, -2)) * scale, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    finite = vf.isfinite()
    o = probs @ torch.where(finite, vf, 0.0)
    # Non-finite values at visible keys propagate as IEEE sums would: NaN if a visible value is
    # NaN or both infinities are seen, else the infinity seen. Visible keys of a valid query i
    # are the valid j <= i (causal) or all valid j, so counts are a cumsum / sum over keys.
    flags = torch.cat([vf.isnan(), vf == float("inf"), vf == float("-inf")], dim=-1)
    flags = (flags & valid[:, None, :, None]).float()  # [B, H, Nf, 3D]
    seen = flags.cumsum(dim=2) if causal else flags.sum(dim=2, keepdim=True)
    nan_seen, pos_seen, neg_seen = (seen[..., i * vf.shape[-1] : (i + 1) * vf.shape[-1]] > 0 for i in range(3))
    o = torch.where(pos_seen, float("inf"), o)
    o = torch.where(neg_seen, float("-inf"), o)
    o = torch.where(nan_seen | (pos_seen & neg_seen), float("nan"), o)
    return segment_mean(o, index, valid, num_merged).to(q.dtype)
