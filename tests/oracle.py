"""Float64 oracles written as plain per-image loops, independent of the vectorised reference.

They restate the README's Semantics section as directly as possible; the reference backend is
tested against them, and every other backend against the reference and them.
"""

import math

import torch


def dtome_oracle(x, metric, size, lengths, threshold, protect_first=False):
    """One merge step per image in float64. Returns (x_out, size_out, row_map, new_lengths, node_max)."""
    bsz, n, d = x.shape
    x_out = torch.zeros(bsz, n, d, dtype=torch.float64)
    size_out = torch.zeros(bsz, n, dtype=torch.float64)
    row_map = torch.full((bsz, n), -1, dtype=torch.int32)
    new_lengths = torch.zeros(bsz, dtype=torch.int32)
    node_max_all = torch.full((bsz, (n + 1) // 2), -math.inf, dtype=torch.float64)
    for b in range(bsz):
        t = int(lengths[b])
        tau = float(threshold[b]) if isinstance(threshold, torch.Tensor) and threshold.dim() else float(threshold)
        m = metric[b, :t].double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sources = [i for i in range(0, t, 2) if not (protect_first and i == 0)]
        dests = list(range(1, t, 2))
        best = {}
        for a in sources:
            if not dests:
                continue
            scores = [float(m[a] @ m[j]) for j in dests]
            top = max(scores)
            best[a] = (top, dests[scores.index(top)])
            node_max_all[b, a // 2] = top
        merged = [a for a in sources if a in best and best[a][0] > tau]
        cap = max((t - int(protect_first)) // 2, 0)
        if len(merged) > cap:
            keep = min(merged, key=lambda a: (best[a][0], a))
            merged.remove(keep)
        unmerged = [i for i in range(0, t, 2) if i not in merged]
        order = unmerged + dests
        new_row = {old: new for new, old in enumerate(order)}
        for a in merged:
            new_row[a] = new_row[best[a][1]]
        for old, new in new_row.items():
            row_map[b, old] = new
            s = float(size[b, old])
            x_out[b, new] += s * x[b, old].double()
            size_out[b, new] += s
        new_lengths[b] = len(order)
    x_out = torch.where(size_out[..., None] > 0, x_out / size_out.clamp_min(1e-300)[..., None], 0.0)
    return x_out, size_out, row_map, new_lengths, node_max_all


def vtu_oracle(q, k, v, cos, sin, pos_map, full_lengths=None, causal=True, scale=None):
    """VTU attention in float64, one image and head at a time. cos/sin [Nf', D] or [B, Nf', D]."""
    bsz, hq, nu, d = q.shape
    hkv = k.shape[1]
    nf = pos_map.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(bsz, hq, nu, d, dtype=torch.float64)
    for b in range(bsz):
        t = nf if full_lengths is None else int(full_lengths[b])
        u = pos_map[b, :t].long()
        c = (cos[b] if cos.dim() == 3 else cos)[:t].double()
        s = (sin[b] if sin.dim() == 3 else sin)[:t].double()

        def rope(x):
            half = d // 2
            return x * c + torch.cat([-x[:, half:], x[:, :half]], dim=-1) * s

        counts = torch.bincount(u, minlength=nu).double()
        for h in range(hq):
            g = h // (hq // hkv)
            qf, kf, vf = rope(q[b, h, u].double()), rope(k[b, g, u].double()), v[b, g, u].double()
            logits = qf @ kf.T * scale
            if causal:
                logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
            o = torch.softmax(logits, dim=-1) @ vf
            sums = torch.zeros(nu, d, dtype=torch.float64).index_add_(0, u, o)
            out[b, h] = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], 0.0)
    return out
