"""Reference (pure PyTorch) decode attention over a merged KV cache: the executable spec of
``dk.vtu_decode_attention`` (issue 11).

Arguments are validated and normalised by ``dymu_kernels.api``: cos/sin are [B, P', D] (a
broadcast view when the caller gave [P', D]), pos_map is int32 [B, P], q_positions int32
[B, Tq] in [0, P'), full_lengths int32 [B] in [0, P]. All math is fp32; shapes depend only on
the input shapes (no data-dependent shapes, no host reads), so it runs on meta/fake tensors.

Masking: key position j is visible to query t iff j < full_lengths[b] and j <= q_positions[b, t].
Hidden keys are removed with ``torch.where`` (selection, never a multiplication by zero), so
NaN/inf in hidden K/V rows, map entries or cos/sin rows cannot reach an output; non-finite
values at visible keys propagate. A query that sees no key gets 0.

Memory: the gathered, rotated K/V of all P positions in fp32, plus a [B, Hq, chunk, P, D]
product per chunk of queries (this is a specification, not a kernel).
"""

import torch

from ..vtu.reference import apply_rope

SUPPORTED = frozenset({"vtu_decode_attention"})

_QUERY_CHUNK = 16  # queries whose value products are formed at once (memory bound of the spec)


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, R, D] rows -> [B, H, P, D] fp32, row index[b, j] at position j (index [B, P] long)."""
    bsz, heads, _, dim = rows.shape
    return rows.float().gather(2, index[:, None, :, None].expand(bsz, heads, index.shape[1], dim))


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
    """Causal RoPE attention of queries at given positions over a merged cache; see the api."""
    bsz, hq, tq, dim = q.shape
    hkv, num_rows = k_rows.shape[1], k_rows.shape[2]
    num_pos = pos_map.shape[1]
    device = q.device
    positions = torch.arange(num_pos, device=device)
    exists = positions[None, :] < full_lengths[:, None]  # [B, P]
    index = torch.where(exists, pos_map, 0).long().clamp(0, max(num_rows - 1, 0))
    cos_k, sin_k = cos[:, None, :num_pos].float(), sin[:, None, :num_pos].float()
    keys = apply_rope(gather_rows(k_rows, index), cos_k, sin_k)  # [B, Hkv, P, D]
    values = gather_rows(v_rows, index)
    qpos = q_positions.long()
    cos_q = cos.float().gather(1, qpos[..., None].expand(bsz, tq, dim))[:, None]  # [B, 1, Tq, D]
    sin_q = sin.float().gather(1, qpos[..., None].expand(bsz, tq, dim))[:, None]
    queries = apply_rope(q.float(), cos_q, sin_q)  # [B, Hq, Tq, D]
    group = hq // hkv
    keys = keys.repeat_interleave(group, dim=1)  # [B, Hq, P, D]
    values = values.repeat_interleave(group, dim=1)
    visible = exists[:, None, :] & (positions[None, None, :] <= qpos[:, :, None])  # [B, Tq, P]
    visible = visible[:, None]  # [B, 1, Tq, P]
    logits = torch.where(visible, (queries @ keys.transpose(-1, -2)) * scale, float("-inf"))
    seen = visible.any(-1, keepdim=True)  # [B, 1, Tq, 1]
    top = torch.where(seen, logits.amax(-1, keepdim=True), 0.0)
    weights = torch.where(visible, torch.exp(logits - top), 0.0)  # [B, Hq, Tq, P]
    denom = weights.sum(-1, keepdim=True)
    outs = []
    for start in range(0, tq, _QUERY_CHUNK):
        w = weights[:, :, start : start + _QUERY_CHUNK, :, None]
        vis = visible[:, :, start : start + _QUERY_CHUNK, :, None]
        outs.append(torch.where(vis, w * values[:, :, None], 0.0).sum(-2))
    out = torch.cat(outs, dim=2) / torch.where(seen, denom, 1.0)
    return torch.where(seen, out, 0.0).to(q.dtype)
