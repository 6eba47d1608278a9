"""Native (C++/OpenMP) DToMe backend: real model shapes against the reference, and the
properties the generic tests do not cover (strided input, big batches, determinism across
thread counts and batch compositions, composition of the unfused ops).

Decisions are compared exactly only away from near-ties: a source whose best and second-best
scores (float64) are within GAP = 1e-5, or whose best score is within GAP of the threshold, may
legitimately go either way (the native dot products sum in another order than BLAS).
"""

import math

import pytest
import torch

import dymu_kernels as dk
from dymu_kernels._backends import implements
from helpers import assert_within_2x_torch, clustered_metric, poison_padding

pytestmark = pytest.mark.skipif(not implements("native", "dtome_merge"), reason=f"native: {dk.backend_info()['native']}")

GAP = 1e-5  # far above the fp32 rounding of a C <= 128 dot product of unit rows (~1e-7)


def make(bsz, n, c, d, dtype, lengths=None, seed=0, centres=8, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    metric = clustered_metric(bsz, n, c, centres=centres, noise=noise, generator=g).to(dtype)
    x = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.randint(1, 5, (bsz, n), generator=g).float()
    lengths = torch.full((bsz,), n, dtype=torch.int32) if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    return poison_padding(x, lengths), poison_padding(metric, lengths), size, lengths


def ambiguous_sources(metric, lengths, protect_first, tau):
    """[B, ceil(N/2)] bool: sources whose decision may flip with rounding (see module doc).

    tau = inf flags every runner-up near-tie (for comparing node_idx)."""
    bsz, n, _ = metric.shape
    out = torch.zeros(bsz, (n + 1) // 2, dtype=torch.bool)
    taus = tau if isinstance(tau, torch.Tensor) else torch.full((bsz,), float(tau))
    for b in range(bsz):
        t = int(lengths[b])
        m = metric[b, :t].double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if t < 2:
            continue
        scores = m[0::2] @ m[1::2].T
        top = scores.topk(min(2, scores.shape[1]), dim=-1).values
        tau_b = float(taus[b])
        near = (top[:, 0] - tau_b).abs() < GAP
        if top.shape[1] > 1:  # a runner-up tie matters where the source merges (tau = inf: always)
            near |= ((top[:, 0] - top[:, 1]) < GAP) & ((top[:, 0] > tau_b) | (tau_b == math.inf))
        if protect_first:
            near[0] = False
        out[b, : near.shape[0]] = near
    return out


def tau_for(node_max, merges_per_image):
    """A threshold letting about merges_per_image sources per image merge, away from ties."""
    finite = torch.sort(node_max[torch.isfinite(node_max)], descending=True).values
    k = min(merges_per_image * node_max.shape[0], finite.numel() - 2)
    for j in range(k, finite.numel() - 1):
        if finite[j] - finite[j + 1] > 2 * GAP:
            return float((finite[j] + finite[j + 1]) / 2)
    return float(finite[-1]) - 0.01


@pytest.mark.parametrize(
    "bsz,n,c,d,dtype,protect_first,merges",
    [
        (4, 577, 64, 256, torch.float32, True, 21),  # CLIP ViT-L/14-336 (D cut for speed)
        (2, 1025, 72, 160, torch.bfloat16, False, 40),  # SigLIP-like, odd metric dim
        (3, 577, 64, 128, torch.float16, True, 200),
    ],
)
def test_model_shapes_match_reference(bsz, n, c, d, dtype, protect_first, merges):
    lens = [n] + [n - 17 * (b + 1) for b in range(bsz - 1)]
    x, metric, size, lengths = make(bsz, n, c, d, dtype, lens, seed=n + c)
    nm_ref, ni_ref = dk.bipartite_similarity(metric, lengths, protect_first=protect_first, backend="reference")
    nm, ni = dk.bipartite_similarity(metric, lengths, protect_first=protect_first, backend="native")
    assert torch.equal(torch.isfinite(nm), torch.isfinite(nm_ref))
    assert torch.allclose(nm, nm_ref, atol=2e-6, rtol=0)
    clear = ~ambiguous_sources(metric, lengths, protect_first, math.inf)
    assert torch.equal(ni[clear], ni_ref[clear])

    tau = tau_for(nm_ref, merges)
    amb = ambiguous_sources(metric, lengths, protect_first, tau)
    res = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=protect_first, backend="native")
    ref = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=protect_first, backend="reference")
    images = [b for b in range(bsz) if not amb[b].any()]
    assert len(images) >= bsz - 1, "test data should be mostly free of near-ties"
    for b in images:
        assert torch.equal(res.row_map[b], ref.row_map[b])
        assert res.lengths[b] == ref.lengths[b]
        assert torch.equal(res.size[b], ref.size[b])
        # float64 oracle of the merge, from the reference's decisions
        t = int(lengths[b])
        oracle = torch.zeros(n, d, dtype=torch.float64).index_add_(
            0, ref.row_map[b, :t].long(), x[b, :t].double() * size[b, :t, None].double()
        )
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, ref.row_map[b, :t].long(), size[b, :t].double())
        oracle = torch.where(total[:, None] > 0, oracle / total.clamp_min(1e-30)[:, None], 0.0)
        assert_within_2x_torch(res.x[b], ref.x[b], oracle, floor=1e-5)
    assert (res.lengths < lengths).any() and not res.x.isnan().any()


def test_strided_inputs_equal_contiguous():
    x, metric, size, lengths = make(3, 65, 16, 40, torch.float32, [65, 30, 1], seed=1)
    tau = 0.3
    base = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="native")
    # the same values through non-contiguous views
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(*metric.shape[:2], 2 * metric.shape[2])
    wide[..., ::2] = metric
    ms = wide[..., ::2]  # strided last dim
    ss = size.t().contiguous().t()
    assert not xs.is_contiguous() and not ms.is_contiguous() and not ss.is_contiguous()
    other = dk.dtome_merge(xs, ms, ss, lengths, tau, protect_first=True, backend="native")
    for a, b in zip(base, other):
        if a is not None:
            assert torch.equal(a, b)
    nm_a, _ = dk.bipartite_similarity(metric, lengths, backend="native")
    nm_b, _ = dk.bipartite_similarity(ms, lengths, backend="native")
    assert torch.equal(nm_a, nm_b)


def test_fused_equals_unfused_native_ops():
    x, metric, size, lengths = make(5, 97, 24, 48, torch.bfloat16, [97, 96, 50, 3, 0], seed=2)
    tau = torch.tensor([0.2, 0.5, -math.inf, 0.1, 0.0])
    pos = torch.arange(97, dtype=torch.int32).repeat(5, 1)
    pos = torch.where(pos < lengths[:, None], pos, -1)
    res = dk.dtome_merge(x, metric, size, lengths, tau, pos_map=pos, protect_first=False, backend="native")
    nm, ni = dk.bipartite_similarity(metric, lengths, backend="native")
    row_map, new_len = dk.select_edges(nm, ni, lengths, tau, 97, backend="native")
    xo, so = dk.scatter_merge(x, size, row_map, new_len, backend="native")
    assert torch.equal(res.row_map, row_map) and torch.equal(res.lengths, new_len)
    assert torch.equal(res.x, xo) and torch.equal(res.size, so)
    expected_pos = torch.where(pos >= 0, row_map.gather(1, pos.long().clamp_min(0)), -1)
    assert torch.equal(res.pos_map, expected_pos)


def test_batch_consistent_for_big_images():
    # A batch runs one image per thread; one big image alone runs phase by phase, each phase
    # parallel over rows / source blocks: the same bits.
    x, metric, size, lengths = make(3, 1025, 64, 48, torch.bfloat16, [1025, 1000, 513], seed=7)
    pos = torch.arange(1025, dtype=torch.int32).repeat(3, 1)
    full = dk.dtome_merge(x, metric, size, lengths, 0.3, pos_map=pos, backend="native")
    for b in range(3):
        one = dk.dtome_merge(x[b : b + 1], metric[b : b + 1], size[b : b + 1], lengths[b : b + 1], 0.3,
                             pos_map=pos[b : b + 1], backend="native")
        for a, o in zip(full, one):
            assert torch.equal(a[b : b + 1], o)
    nm, ni = dk.bipartite_similarity(metric, lengths, backend="native")
    nm1, ni1 = dk.bipartite_similarity(metric[2:], lengths[2:], backend="native")
    assert torch.equal(nm[2:], nm1) and torch.equal(ni[2:], ni1)


def test_batch_consistent_and_thread_count_independent():
    # B = 64 runs one image per task; B = 1 runs serially: same bits.
    x, metric, size, lengths = make(64, 129, 32, 64, torch.float16, [129 - (b % 7) for b in range(64)], seed=4)
    tau = 0.25
    full = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="native")
    for b in (0, 5, 63):
        one = dk.dtome_merge(x[b : b + 1], metric[b : b + 1], size[b : b + 1], lengths[b : b + 1], tau,
                             protect_first=True, backend="native")
        for a, o in zip(full, one):
            if a is not None:
                assert torch.equal(a[b : b + 1], o)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="native")
    finally:
        torch.set_num_threads(threads)
    for a, s in zip(full, single):
        if a is not None:
            assert torch.equal(a, s)
    again = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="native")
    for a, s in zip(full, again):
        if a is not None:
            assert torch.equal(a, s)


def test_b64_matches_reference_decisions():
    x, metric, size, lengths = make(64, 49, 16, 24, torch.float32, [49 - (b % 11) for b in range(64)], seed=5)
    nm_ref, _ = dk.bipartite_similarity(metric, lengths, protect_first=True, backend="reference")
    tau = tau_for(nm_ref, 6)
    amb = ambiguous_sources(metric, lengths, True, tau).any(dim=1)
    res = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="native")
    ref = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="reference")
    assert int(amb.sum()) <= 2
    assert torch.equal(res.row_map[~amb], ref.row_map[~amb])
    assert torch.equal(res.lengths[~amb], ref.lengths[~amb])
    assert torch.allclose(res.x[~amb], ref.x[~amb], atol=1e-5, rtol=1e-5)


def test_padding_nan_and_pos_map_minus_one():
    x, metric, size, lengths = make(3, 40, 8, 16, torch.bfloat16, [40, 13, 0], seed=6)
    size = poison_padding(size, lengths)
    pos = torch.randint(0, 40, (3, 100), dtype=torch.int32)
    pos = torch.where(pos < lengths[:, None], pos, -1)
    res = dk.dtome_merge(x, metric, size, lengths, 0.0, pos_map=pos, backend="native")
    assert not res.x.isnan().any() and not res.size.isnan().any()
    assert ((res.pos_map == -1) == (pos == -1)).all()
    assert res.lengths[2] == 0 and (res.row_map[2] == -1).all() and (res.x[2] == 0).all()


@pytest.mark.parametrize("r", [0, 1, 5, 32, 33])  # r <= M = 33 (larger r is rejected)
def test_batch_threshold_matches_reference(r):
    g = torch.Generator().manual_seed(r)
    node_max = torch.rand(4, 33, generator=g) * 2 - 1
    node_max[:, 0] = -math.inf
    node_max[1, 5:] = -math.inf
    ref = dk.batch_threshold(node_max, r, backend="reference")
    nat = dk.batch_threshold(node_max, r, backend="native")
    assert nat.shape == () and nat.dtype == torch.float32
    assert torch.equal(nat, ref)
    ties = torch.full((2, 5), 0.25)
    assert torch.equal(dk.batch_threshold(ties, 1, backend="native"), dk.batch_threshold(ties, 1, backend="reference"))


def test_select_edges_garbage_node_idx_like_reference():
    # select_edges replicates the reference formulas even for inputs bipartite_similarity
    # never produces (a finite score on a padding source, an out-of-place node_idx).
    node_max = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.95], [0.1, 0.9, -math.inf, 0.5, 0.4]])
    node_idx = torch.tensor([[1, 3, 9, 5, 7], [-1, 1, -1, 7, 3]], dtype=torch.int32)
    lengths = torch.tensor([7, 10], dtype=torch.int32)
    for protect in (False, True):
        for tau in (-math.inf, 0.3, 0.85):
            a = dk.select_edges(node_max, node_idx, lengths, tau, 10, protect_first=protect, backend="native")
            b = dk.select_edges(node_max, node_idx, lengths, tau, 10, protect_first=protect, backend="reference")
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow
def test_native_ops_under_torch_compile_fullgraph():
    # The ops mutate the outputs they are given; torch.compile functionalises them (the
    # optional pos_map_out included) and the compiled graph gives the eager bits.
    from dymu_kernels.dtome import native

    x, metric, size, lengths = make(2, 33, 8, 16, torch.float16, [33, 20], seed=8)
    tau = torch.full((2,), 0.3)
    pos = torch.arange(33, dtype=torch.int32).repeat(2, 1)

    def step(x, metric, size, lengths, tau, pos):
        res = native.dtome_merge(x, metric, size, lengths, tau, pos, True)
        plain = native.dtome_merge(x, metric, size, lengths, tau, None, False)
        nm, ni = native.bipartite_similarity(metric, lengths, True)
        row_map, new_len = native.select_edges(nm, ni, lengths, tau, 33, True)
        xo, so = native.scatter_merge(x, size, row_map, new_len)
        return res.x * 2, res.pos_map, res.lengths, plain.row_map, native.batch_threshold(nm, 2), xo, so

    eager = step(x, metric, size, lengths, tau, pos)
    compiled = torch.compile(step, fullgraph=True)(x, metric, size, lengths, tau, pos)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
