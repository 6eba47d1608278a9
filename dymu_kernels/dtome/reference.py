"""Reference (pure PyTorch) DToMe: the executable specification of README, Semantics: DToMe.

Vectorised over the batch, no host synchronisation, runs on any device (meta and fake tensors
included). Arguments are already validated and normalised by ``dymu_kernels.api``:
lengths are int32 [B], thresholds float32 [B], all tensors on one device.
"""

from typing import NamedTuple, Optional, Tuple

import torch

SUPPORTED = frozenset(
    {"bipartite_similarity", "select_edges", "scatter_merge", "dtome_merge", "batch_threshold"}
)


class DToMeResult(NamedTuple):
    """Result of one merge step (``dk.dtome_merge``).

    x [B, N, D] (input dtype), size [B, N] float32, lengths [B] int32,
    pos_map [B, N0] int32 or None, row_map [B, N] int32. Rows >= lengths are zero.
    """

    x: torch.Tensor
    size: torch.Tensor
    lengths: torch.Tensor
    pos_map: Optional[torch.Tensor]
    row_map: torch.Tensor


def _valid_rows(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] bool: row i of image b is a real token (i < lengths[b])."""
    return torch.arange(n, device=lengths.device) < lengths[:, None]


def normalized_metric(metric: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """fp32 rows m / max(||m||, 1e-12), padding rows zeroed (they may hold NaN).

    A valid row holding any NaN/inf comes out all NaN (NaN rule: its scores never form an edge).
    """
    valid = _valid_rows(lengths, metric.shape[1])
    m = torch.where(valid[..., None], metric.float(), 0.0)
    finite = m.isfinite().all(dim=-1, keepdim=True)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(finite, m, float("nan"))


def bipartite_similarity(
    metric: torch.Tensor, lengths: torch.Tensor, protect_first: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best destination (odd row) of every source (even row); see ``dk.bipartite_similarity``."""
    n = metric.shape[1]
    m = normalized_metric(metric, lengths)
    a, b = m[:, 0::2], m[:, 1::2]  # sources: rows 0,2,4..; destinations: rows 1,3,5..
    scores = a @ b.transpose(1, 2)  # [B, ceil(N/2), floor(N/2)], fp32
    dst_valid = (torch.arange(1, n, 2, device=metric.device) < lengths[:, None])[:, None, :]
    # NaN rule: a NaN score never forms an edge (skipped in the max, like -inf).
    scores = scores.masked_fill(~dst_valid | scores.isnan(), float("-inf"))
    src_valid = torch.arange(0, n, 2, device=metric.device) < lengths[:, None]
    if protect_first:
        src_valid[:, 0] = False
    if scores.shape[-1] == 0:  # N = 1: no destination at all
        node_max = torch.full(src_valid.shape, float("-inf"), device=metric.device)
        node_idx = torch.full(src_valid.shape, -1, dtype=torch.int32, device=metric.device)
        return node_max, node_idx
    node_max = scores.amax(dim=-1)
    j = scores.argmax(dim=-1)  # argmax documents the first maximal index: ties -> smallest row
    node_max = node_max.masked_fill(~src_valid, float("-inf"))
    found = node_max > float("-inf")
    node_idx = torch.where(found, 2 * j + 1, -1).to(torch.int32)
    return node_max, node_idx


def merge_mask(
    node_max: torch.Tensor, lengths: torch.Tensor, threshold: torch.Tensor, protect_first: bool
) -> torch.Tensor:
    """[B, ceil(N/2)] bool: source row 2i merges (rule 4: strict test, then the cap)."""
    merged = node_max > threshold[:, None]
    cap = torch.div(lengths - int(protect_first), 2, rounding_mode="floor").clamp_min(0)
    over = merged.sum(dim=-1) > cap  # exceeds the cap by exactly one source when it bites
    # The source that stays: the smallest node_max among the merged, ties -> smallest row.
    keyed = torch.where(merged, node_max, float("inf"))
    drop = torch.nn.functional.one_hot(keyed.argmin(dim=-1), merged.shape[-1]).bool()
    return merged & ~(drop & over[:, None])


def select_edges(
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    lengths: torch.Tensor,
    threshold: torch.Tensor,
    num_rows: int,
    protect_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """row_map [B, N] and new_lengths [B]; see ``dk.select_edges`` (rules 4 and 6)."""
    device = node_max.device
    merged = merge_mask(node_max, lengths, threshold, protect_first)
    src_rows = torch.arange(0, num_rows, 2, device=device)
    dst_rows = torch.arange(1, num_rows, 2, device=device)
    src_valid = src_rows < lengths[:, None]
    dst_valid = dst_rows < lengths[:, None]
    unmerged = src_valid & ~merged
    num_unmerged = unmerged.sum(dim=-1, keepdim=True)
    # New order: [unmerged sources in order ; destinations in order], then padding.
    src_new = torch.cumsum(unmerged.int(), dim=-1) - 1
    dst_new = num_unmerged + torch.arange(dst_rows.numel(), device=device)
    dst_new = torch.where(dst_valid, dst_new, -1)
    # A merged source takes the new row of its destination (odd row 2j+1 -> column j).
    dst_col = torch.div(node_idx.long().clamp_min(1) - 1, 2, rounding_mode="floor")
    if dst_rows.numel() == 0:  # N = 1: nothing can merge
        src_to_dst = torch.full_like(src_new, -1)
    else:
        src_to_dst = dst_new.gather(1, dst_col.clamp_max(dst_rows.numel() - 1))
    src_new = torch.where(merged, src_to_dst, torch.where(unmerged, src_new, -1))
    row_map = torch.empty(node_max.shape[0], num_rows, dtype=torch.int32, device=device)
    row_map[:, 0::2] = src_new.to(torch.int32)
    row_map[:, 1::2] = dst_new.to(torch.int32)
    new_lengths = (lengths - merged.sum(dim=-1)).to(torch.int32)
    return row_map, new_lengths


def scatter_merge(
    x: torch.Tensor, size: torch.Tensor, row_map: torch.Tensor, new_lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every row into row_map's row (rule 5); fp32 accumulation.

    Rows that no valid row maps to (rows >= new_lengths) come out as x = 0, size = 0.
    """
    bsz, n, d = x.shape
    valid = row_map >= 0
    size32 = torch.where(valid, size.float(), 0.0)
    weighted = torch.where(valid[..., None], x.float() * size32[..., None], 0.0)
    dest = row_map.long().clamp_min(0)
    total = torch.zeros(bsz, n, d, dtype=torch.float32, device=x.device)
    total.scatter_add_(1, dest[..., None].expand(bsz, n, d), weighted)
    size_out = torch.zeros(bsz, n, dtype=torch.float32, device=x.device)
    size_out.scatter_add_(1, dest, size32)
    x_out = torch.where(size_out[..., None] > 0, total / size_out.clamp_min(1e-30)[..., None], 0.0)
    return x_out.to(x.dtype), size_out


def update_pos_map(pos_map: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """pos_map'[b, p] = row_map[b, pos_map[b, p]] (-1 stays -1)."""
    moved = row_map.gather(1, pos_map.long().clamp_min(0))
    return torch.where(pos_map >= 0, moved, -1).to(torch.int32)


def dtome_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    lengths: torch.Tensor,
    threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor],
    protect_first: bool,
) -> DToMeResult:
    """One DToMe step: similarity, selection, merge and bookkeeping; see ``dk.dtome_merge``."""
    node_max, node_idx = bipartite_similarity(metric, lengths, protect_first)
    row_map, new_lengths = select_edges(node_max, node_idx, lengths, threshold, x.shape[1], protect_first)
    x_out, size_out = scatter_merge(x, size, row_map, new_lengths)
    new_pos = update_pos_map(pos_map, row_map) if pos_map is not None else None
    return DToMeResult(x_out, size_out, new_lengths, new_pos, row_map)


def batch_threshold(node_max: torch.Tensor, r: int) -> torch.Tensor:
    """The (B*r + 1)-th largest node_max of the batch, clamped at >= 0 (paper eq. 4).

    NaN entries count as -inf (no edge)."""
    flat = node_max.reshape(-1).float()
    flat = flat.masked_fill(flat.isnan(), float("-inf"))
    k = node_max.shape[0] * r + 1
    if k > flat.numel():
        return torch.zeros((), dtype=torch.float32, device=node_max.device)
    kth = torch.topk(flat, k, sorted=True).values[k - 1]
    return kth.clamp_min(0.0)
