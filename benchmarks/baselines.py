"""What a user would otherwise run: eager baselines in the style of the official DyMU code.

These are written from the paper's and the official code's described behaviour, kept with the
benchmarks (not in the package), and used only for timing and memory comparisons.

- ``official_style_dtome_merge``: the official inference path, one image at a time (its
  thresholded merge count differs per image): normalise, A.B^T scores, max, a host-side
  ``.item()`` count of edges over the threshold, ToMe-style argsort / gather / scatter_reduce
  for the size-weighted merge, and the dense (N_cur, N_orig) source matrix for position
  tracking.
- ``fast_path_vtu_attention``: the official VTU fast path: gather Q/K/V to full length, apply
  RoPE, SDPA on the full sequence, segment mean back to merged rows.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F


def _official_merge_one(x, metric, size, source, threshold: float, class_token: bool):
    """One image: x [1, t, D], metric [1, t, C], size [1, t, 1], source [1, t, N0] (dense)."""
    t = metric.shape[1]
    protected = int(class_token)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    r = int((node_max > threshold).sum().item())  # host synchronisation, once per image and layer
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return x, size, source
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t_in: torch.Tensor, mode: str) -> torch.Tensor:
        src, dst = t_in[..., ::2, :], t_in[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size, "sum")
    size = merge(size, "sum")
    x = x / size
    source = merge(source, "amax")
    return x, size, source


def official_style_dtome_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, threshold: float, class_token: bool = True
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Merge a batch image by image as the official code does. x [B, N, D], metric [B, N, C],
    size [B, N] -> per-image lists of x [1, N', D], size [1, N', 1] and dense source [1, N', N]."""
    xs, sizes, sources = [], [], []
    n = x.shape[1]
    eye = torch.eye(n, device=x.device, dtype=x.dtype)[None]
    for i in range(x.shape[0]):
        xi, si, src = _official_merge_one(
            x[i : i + 1], metric[i : i + 1], size[i : i + 1, :, None].to(x.dtype), eye, threshold, class_token
        )
        xs.append(xi)
        sizes.append(si)
        sources.append(src)
    return xs, sizes, sources


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def fast_path_vtu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos_map: torch.Tensor
) -> torch.Tensor:
    """The official VTU fast path for one sequence layout shared by the batch rows.

    q [B, Hq, Nu, D], k/v [B, Hkv, Nu, D], cos/sin [Nf, D], pos_map [B, Nf] (every position valid).
    Gathers to full length in the input dtype, applies RoPE, runs causal SDPA (flash where
    available) with GQA, and averages back to the merged rows.
    """
    bsz, hq, nu, d = q.shape
    nf = pos_map.shape[1]
    index = pos_map.long()
    gather = lambda t: t.gather(2, index[:, None, :, None].expand(bsz, t.shape[1], nf, d))  # noqa: E731
    cos, sin = cos[:nf].to(q.dtype), sin[:nf].to(q.dtype)
    qf, kf, vf = gather(q), gather(k), gather(v)
    qf = qf * cos + _rotate_half(qf) * sin
    kf = kf * cos + _rotate_half(kf) * sin
    o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=hq != k.shape[1])
    sums = torch.zeros(bsz, hq, nu, d, dtype=torch.float32, device=q.device)
    sums.scatter_add_(2, index[:, None, :, None].expand(bsz, hq, nf, d), o.float())
    counts = torch.zeros(bsz, nu, device=q.device).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return (sums / counts.clamp_min(1)[:, None, :, None]).to(q.dtype)
