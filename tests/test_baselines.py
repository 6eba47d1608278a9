"""The benchmark baselines compute what the ops compute (so the timing ratios compare like with like)."""

import os
import sys

import torch

import dymu_kernels as dk
from helpers import clustered_metric, onto_map, rope_tables

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from baselines import fast_path_vtu_attention, official_style_dtome_merge  # noqa: E402


def test_official_style_merge_matches_reference_with_cls():
    g = torch.Generator().manual_seed(0)
    metric = clustered_metric(3, 41, 16, centres=5, noise=0.3, generator=g)
    x = torch.randn(3, 41, 24, generator=g)
    size = torch.ones(3, 41)
    tau = 0.8
    res = dk.dtome_merge(x, metric, size, None, tau, pos_map=torch.arange(41).repeat(3, 1), protect_first=True,
                         backend="reference")
    xs, sizes, sources = official_style_dtome_merge(x, metric, size, tau, class_token=True)
    for b in range(3):
        t = int(res.lengths[b])
        assert xs[b].shape[1] == t
        assert torch.allclose(xs[b][0], res.x[b, :t], atol=1e-5)
        assert torch.equal(sizes[b][0, :, 0], res.size[b, :t])
        # dense source matrix vs the O(N) pos_map
        assert torch.equal(sources[b][0].argmax(0), res.pos_map[b].long())


def test_fast_path_matches_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 9, 16, generator=g) for h in (6, 2, 2))
    pos_map = onto_map(1, 20, 9, generator=g)
    cos, sin = rope_tables(20, 16)
    expected = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="reference")
    assert torch.allclose(fast_path_vtu_attention(q, k, v, cos, sin, pos_map), expected, atol=1e-5)
