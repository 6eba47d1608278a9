"""Reference (pure PyTorch) packed variable-length DToMe: the spec of the varlen ops.

Packed layout (flash-attention varlen style): the rows of B images concatenated, ``x`` [T, D],
``cu_seqlens`` [B + 1] int32 with image b owning rows cu_seqlens[b] .. cu_seqlens[b+1]. Rows at
and past the total cu_seqlens[B] are capacity (they may hold anything, NaN included; nothing
from them reaches an output). Every op here has exactly the per-image semantics of its padded
counterpart (README, Semantics: DToMe) and returns outputs of the same static capacity T.

Vectorised over the whole packed batch with no host synchronisation and no data-dependent
shape, so it runs on meta and fake tensors. The price: the similarity and the attention are
computed as dense [T, T] block-diagonal masked products (O(T^2) memory; the native and Triton
backends work per image). Arguments arrive validated and normalised from ``dymu_kernels.api``:
cu_seqlens int32 [B + 1], thresholds float32 [B], sizes float32, maps int32.
"""

from typing import NamedTuple, Optional, Tuple

import torch

SUPPORTED = frozenset({"dtome_merge_varlen", "proportional_attention_varlen"})


class DToMeVarlenResult(NamedTuple):
    """Result of one packed merge step (``dk.dtome_merge_varlen``); T = the input capacity.

    x [T, D] (input dtype), size [T] float32, cu_seqlens [B + 1] int32 (the new offsets),
    pos_map (the input pos_map's shape) int32 or None: packed row of every original token,
    row_map [T] int32: new packed row of every old row (-1 past the old total).
    Rows >= cu_seqlens[B] are zero (x and size).
    """

    x: torch.Tensor
    size: torch.Tensor
    cu_seqlens: torch.Tensor
    pos_map: Optional[torch.Tensor]
    row_map: torch.Tensor


def segments(cu_seqlens: torch.Tensor, num_rows: int):
    """Per packed row: (image index clamped to [0, B), local row, valid = row < total)."""
    rows = torch.arange(num_rows, dtype=torch.int32, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:], rows, right=True)  # = B past the total
    valid = rows < cu_seqlens[-1]
    seg = seg.clamp_max(cu_seqlens.shape[0] - 2)
    local = rows - cu_seqlens[seg]
    return seg, local, valid


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, batch: int) -> torch.Tensor:
    out = torch.zeros(batch, dtype=values.dtype, device=values.device)
    return out.scatter_add_(0, seg, values)


def _gather_padded(packed: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Packed [T, ...] -> [B, width, ...]: row l of image b = packed row cu[b] + l (clamped; the
    rows past an image's length are garbage and masked by the padded op's lengths)."""
    rows = (cu_seqlens[:-1, None].long() + torch.arange(width, device=packed.device)).clamp_max(packed.shape[0] - 1)
    return packed[rows]


def merge_via_padded(x, metric, size, cu_seqlens, threshold, pos_map, protect_first, width, padded_merge=None):
    """The same step through a padded ``dtome_merge`` backend on [B, width] gathers of the packed
    rows (width >= every length), scattered back to the packed layout: O(B * width^2) work
    instead of the dense path's O(T^2). ``padded_merge``: a backend's normalised
    ``dtome_merge`` (default the reference's); no host sync."""
    if padded_merge is None:
        from ..dtome.reference import dtome_merge as padded_merge

    num_rows = x.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
    res = padded_merge(
        _gather_padded(x, cu_seqlens, width), _gather_padded(metric, cu_seqlens, width),
        _gather_padded(size, cu_seqlens, width), lengths, threshold, None, protect_first,
    )
    new_cu = torch.cat([cu_seqlens[:1], torch.cumsum(res.lengths, 0)]).to(torch.int32)
    seg, local, valid = segments(new_cu, num_rows)  # output rows: image and local row
    local = local.long().clamp(0, width - 1)
    x_out = torch.where(valid[:, None], res.x[seg.long(), local], torch.zeros((), dtype=x.dtype, device=x.device))
    size_out = torch.where(valid, res.size[seg.long(), local], 0.0)
    seg_in, local_in, valid_in = segments(cu_seqlens, num_rows)  # input rows
    moved = res.row_map[seg_in.long(), local_in.long().clamp(0, width - 1)]
    row_map = torch.where(valid_in & (moved >= 0), moved + new_cu[seg_in.long()], -1).to(torch.int32)
    new_pos = None
    if pos_map is not None:
        new_pos = torch.where(pos_map >= 0, row_map[pos_map.long().clamp_min(0)], -1).to(torch.int32)
    return DToMeVarlenResult(x_out, size_out, new_cu, new_pos, row_map)


def dtome_merge_varlen(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: torch.Tensor,
    pos_map: Optional[torch.Tensor],
    protect_first: bool,
    max_seqlen: int = 0,
) -> DToMeVarlenResult:
    """One DToMe step on the packed layout; see ``dk.dtome_merge_varlen``.

    With a bound 0 < max_seqlen < T on every image's length the step runs through the padded
    reference on [B, max_seqlen] views; otherwise on dense block-diagonal [T, T] scores."""
    num_rows, _ = x.shape
    if 0 < max_seqlen < num_rows:
        return merge_via_padded(x, metric, size, cu_seqlens, threshold, pos_map, protect_first, max_seqlen)
    batch = cu_seqlens.shape[0] - 1
    device = x.device
    rows = torch.arange(num_rows, device=device)
    seg, local, valid = segments(cu_seqlens, num_rows)
    seg64 = seg.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]

    # Steps 1-3: normalised metric, best destination (odd local row of the same image).
    m = torch.where(valid[:, None], metric.float(), 0.0)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    is_src = valid & (local % 2 == 0)
    is_dst = valid & (local % 2 == 1)
    can_merge = is_src & ~((local == 0) & protect_first)
    scores = m @ m.transpose(0, 1)  # [T, T] fp32; only same-image (source, destination) pairs count
    pair = can_merge[:, None] & is_dst[None, :] & (seg[:, None] == seg[None, :])
    scores = scores.masked_fill(~pair, float("-inf"))
    node_max = scores.amax(dim=-1)
    node_idx = scores.argmax(dim=-1)  # the first maximal column: ties -> smallest row

    # Step 4: strict threshold, then the per-image cap (drop the weakest merged source).
    merged = node_max > threshold[seg64]
    cap = torch.div(lengths - int(protect_first), 2, rounding_mode="floor").clamp_min(0)
    over = _segment_sum(merged.int(), seg64, batch) > cap
    keyed = torch.where(merged, node_max, float("inf"))
    weakest = torch.full((batch,), float("inf"), device=device).scatter_reduce(0, seg64, keyed, "amin")
    candidate = merged & (keyed == weakest[seg64])
    first = torch.full((batch,), num_rows, device=device).scatter_reduce(
        0, seg64, torch.where(candidate, rows, num_rows), "amin"
    )
    merged = merged & ~((rows == first[seg64]) & over[seg64])

    # Step 6: new order per image [unmerged sources ; destinations], images packed again.
    unmerged = is_src & ~merged
    num_unmerged = _segment_sum(unmerged.int(), seg64, batch)
    new_lengths = lengths - _segment_sum(merged.int(), seg64, batch)
    new_cu = torch.cat([cu_seqlens[:1], torch.cumsum(new_lengths, 0)]).to(torch.int32)
    inclusive = torch.cumsum(unmerged.int(), 0)
    exclusive = torch.cat([inclusive - unmerged.int(), inclusive[-1:]])  # [T + 1]
    before = exclusive[cu_seqlens[:-1].long()]  # unmerged sources of earlier images
    src_local = inclusive - 1 - before[seg64]
    dst_local = num_unmerged[seg64] + torch.div(local, 2, rounding_mode="floor")
    new_row = new_cu[seg64] + torch.where(is_dst, dst_local, src_local)
    kept = unmerged | is_dst
    new_row = torch.where(kept, new_row, -1)
    row_map = torch.where(merged, new_row[node_idx], new_row).to(torch.int32)

    # Step 5: size-weighted merge into the new rows, fp32 accumulation.
    size32 = torch.where(row_map >= 0, size.float(), 0.0)
    weighted = torch.where((row_map >= 0)[:, None], x.float() * size32[:, None], 0.0)
    dest = row_map.long().clamp_min(0)
    total = torch.zeros(x.shape, dtype=torch.float32, device=device)
    total.scatter_add_(0, dest[:, None].expand_as(weighted), weighted)
    size_out = torch.zeros(num_rows, dtype=torch.float32, device=device).scatter_add_(0, dest, size32)
    x_out = torch.where(size_out[:, None] > 0, total / size_out.clamp_min(1e-30)[:, None], 0.0).to(x.dtype)

    new_pos = None
    if pos_map is not None:
        moved = row_map[pos_map.long().clamp_min(0)]
        new_pos = torch.where(pos_map >= 0, moved, -1).to(torch.int32)
    return DToMeVarlenResult(x_out, size_out, new_cu, new_pos, row_map)


def _attention_via_padded(q, k, v, size, cu_seqlens, scale, width):
    """proportional_attention_varlen on [B, width] gathers of the packed rows (width >= every length)."""
    num_rows = q.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    local_valid = torch.arange(width, device=q.device) < lengths[:, None]  # [B, W]
    qp, kp, vp = (_gather_padded(t, cu_seqlens, width).float().transpose(1, 2) for t in (q, k, v))  # [B, H, W, D]
    sp = _gather_padded(size, cu_seqlens, width).float()
    qp, kp, vp = (torch.where(local_valid[:, None, :, None], t, 0.0) for t in (qp, kp, vp))  # garbage rows may be NaN
    bias = torch.where(local_valid, torch.where(local_valid, sp, 1.0).log(), float("-inf"))  # [B, W]
    logits = (qp @ kp.transpose(-1, -2)) * scale + bias[:, None, None, :]
    row_max = logits.amax(dim=-1, keepdim=True)
    live = row_max > float("-inf")
    p = torch.exp(logits - torch.where(live, row_max, 0.0))
    p = torch.where(live, p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30), 0.0)
    out = (p @ vp).transpose(1, 2)  # [B, W, H, D]
    seg, local, valid = segments(cu_seqlens, num_rows)
    rows = out[seg.long(), local.long().clamp(0, width - 1)]
    return torch.where(valid[:, None, None], rows, 0.0).to(q.dtype).contiguous()


def proportional_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    max_seqlen: int = 0,
) -> torch.Tensor:
    """Block-diagonal attention with the log-size key bias; see ``dk.proportional_attention_varlen``.

    Dense [H, T, T] masked fp32 scores (the spec, not a fast path); with a bound
    0 < max_seqlen < T on every image's length, the same math on [B, H, max_seqlen, max_seqlen]
    gathers instead. Query rows past the total, and rows whose image has no key of positive size,
    come out as zero.
    """
    if 0 < max_seqlen < q.shape[0]:
        return _attention_via_padded(q, k, v, size, cu_seqlens, scale, max_seqlen)
    num_rows = q.shape[0]
    seg, _, valid = segments(cu_seqlens, num_rows)
    same = (seg[:, None] == seg[None, :]) & valid[:, None] & valid[None, :]
    bias = torch.where(same, torch.where(valid, size.float(), 1.0).log()[None, :], float("-inf"))
    q32 = torch.where(valid[:, None, None], q.float(), 0.0)  # capacity rows may hold NaN
    k32 = torch.where(valid[:, None, None], k.float(), 0.0)
    logits = torch.einsum("ihd,jhd->hij", q32, k32) * scale + bias
    row_max = logits.amax(dim=-1, keepdim=True)
    live = row_max > float("-inf")
    p = torch.exp(logits - torch.where(live, row_max, 0.0))
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    out = torch.einsum("hij,jhd->ihd", torch.where(live, p, 0.0), torch.where(valid[:, None, None], v.float(), 0.0))
    return out.to(q.dtype).contiguous()
