"""DToMe ops: every backend against the float64 oracle and the reference, plus properties.

Backends that do not implement an op yet are skipped with the reason. Under the Triton
interpreter shapes stay tiny.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dymu_kernels as dk
from conftest import backend_params, device_for
from helpers import assert_within_2x_torch, clustered_metric, poison_padding
from oracle import dtome_oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def away_from_ties(node_max: torch.Tensor, quantile: float) -> float:
    """A threshold between two finite scores that are at least 1e-3 apart (no near-tie decisions)."""
    finite = torch.sort(node_max[torch.isfinite(node_max)].flatten()).values
    if finite.numel() < 2:
        return 0.5
    i = min(int(quantile * (finite.numel() - 1)), finite.numel() - 2)
    for j in list(range(i, finite.numel() - 1)) + list(range(i - 1, -1, -1)):
        if finite[j + 1] - finite[j] > 1e-3:
            return float((finite[j] + finite[j + 1]) / 2)
    return float(finite[-1]) + 0.01


def make_inputs(bsz, n, c, d, dtype, lengths, seed=0, centres=3):
    g = torch.Generator().manual_seed(seed)
    metric = clustered_metric(bsz, n, c, centres=centres, noise=0.3, dtype=dtype, generator=g)
    x = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.randint(1, 4, (bsz, n), generator=g).float()
    lengths = torch.tensor(lengths, dtype=torch.int32)
    return poison_padding(x, lengths), poison_padding(metric, lengths), size, lengths


CASES = [
    # (B, N, C, D, lengths)
    (2, 16, 8, 12, [16, 11]),
    (3, 15, 16, 8, [15, 0, 7]),
    (1, 1, 4, 4, [1]),
    (2, 2, 4, 4, [2, 1]),
    (2, 33, 32, 20, [33, 32]),
]


@pytest.mark.parametrize("backend", backend_params("dtome_merge"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}")
@pytest.mark.parametrize("protect_first", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["typical", "per_image", "+inf", "-inf"])
def test_dtome_merge_matches_oracle(backend, case, protect_first, dtype, mode):
    bsz, n, c, d, lens = case
    x, metric, size, lengths = make_inputs(bsz, n, c, d, dtype, lens)
    _, _, _, _, node_max = dtome_oracle(x, metric, size, lengths, math.inf, protect_first)
    if mode == "typical":
        tau = away_from_ties(node_max, 0.5)
    elif mode == "per_image":
        tau = torch.tensor([away_from_ties(node_max[b], 0.3 + 0.4 * (b % 2)) for b in range(bsz)])
    else:
        tau = float(mode)
    x_ref, size_ref, row_map_ref, len_ref, _ = dtome_oracle(x, metric, size, lengths, tau, protect_first)
    dev = device_for(backend)
    pos_map = torch.arange(n, dtype=torch.int32).repeat(bsz, 1)
    res = dk.dtome_merge(
        x.to(dev), metric.to(dev), size.to(dev), lengths.to(dev),
        tau.to(dev) if isinstance(tau, torch.Tensor) else tau,
        pos_map=pos_map.to(dev), protect_first=protect_first, backend=backend,
    )
    assert res.x.dtype == dtype and res.size.dtype == torch.float32
    assert torch.equal(res.lengths.cpu(), len_ref)
    assert torch.equal(res.row_map.cpu(), row_map_ref)
    assert torch.equal(res.pos_map.cpu(), row_map_ref), "pos_map from the identity must equal row_map"
    assert torch.equal(res.size.cpu(), size_ref.float())
    assert_within_2x_torch(res.x.cpu(), x_ref.to(dtype), x_ref, floor=1e-5)
    # rows past the new lengths are zero, not garbage
    pad = torch.arange(n)[None, :] >= len_ref[:, None]
    assert (res.x.cpu()[pad] == 0).all() and (res.size.cpu()[pad] == 0).all()


@pytest.mark.parametrize("backend", backend_params("bipartite_similarity"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}")
@pytest.mark.parametrize("protect_first", [False, True])
def test_bipartite_similarity_matches_oracle(backend, case, protect_first):
    bsz, n, c, d, lens = case
    x, metric, size, lengths = make_inputs(bsz, n, c, d, torch.float32, lens)
    *_, node_max_ref = dtome_oracle(x, metric, size, lengths, math.inf, protect_first)
    dev = device_for(backend)
    node_max, node_idx = dk.bipartite_similarity(metric.to(dev), lengths.to(dev), protect_first=protect_first, backend=backend)
    assert node_max.dtype == torch.float32 and node_idx.dtype == torch.int32
    assert node_max.shape == (bsz, (n + 1) // 2)
    node_max, node_idx = node_max.cpu(), node_idx.cpu()
    finite = torch.isfinite(node_max_ref)
    assert torch.equal(torch.isfinite(node_max), finite)
    assert torch.allclose(node_max[finite].double(), node_max_ref[finite], atol=1e-6)
    assert ((node_idx == -1) == ~finite).all()
    assert (node_idx[finite] % 2 == 1).all()


@pytest.mark.parametrize("backend", backend_params("select_edges"))
def test_select_edges_cap_keeps_weakest_source(backend):
    # t = 5 odd, nothing protected, every source passes: sources 0,2,4 but only 2 may merge.
    node_max = torch.tensor([[0.9, 0.5, 0.7]])
    node_idx = torch.tensor([[1, 3, 3]], dtype=torch.int32)
    lengths = torch.tensor([5], dtype=torch.int32)
    dev = device_for(backend)
    row_map, new_len = dk.select_edges(node_max.to(dev), node_idx.to(dev), lengths.to(dev), -math.inf, 5, backend=backend)
    # source 2 (score 0.5) stays: new order [2 ; 1, 3] -> rows 0, 1, 2
    assert new_len.tolist() == [3]
    assert row_map.cpu().tolist() == [[1, 1, 0, 2, 2]]


@pytest.mark.parametrize("backend", backend_params("select_edges"))
def test_select_edges_cap_tie_goes_to_smallest_row(backend):
    node_max = torch.tensor([[0.5, 0.5, 0.5]])
    node_idx = torch.tensor([[1, 1, 3]], dtype=torch.int32)
    dev = device_for(backend)
    row_map, new_len = dk.select_edges(
        node_max.to(dev), node_idx.to(dev), torch.tensor([5], dtype=torch.int32, device=dev), 0.0, 5, backend=backend
    )
    assert new_len.tolist() == [3]
    assert row_map.cpu().tolist() == [[0, 1, 1, 2, 2]]


@pytest.mark.parametrize("backend", backend_params("scatter_merge"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_merge_every_source_merged(backend, dtype):
    # N = 6, all three sources merge into destination 1: new rows [1, 3, 5] -> 0, 1, 2
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(1, 6, 4).to(dtype)
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0, 1.0]])
    row_map = torch.tensor([[0, 0, 0, 1, 0, 2]], dtype=torch.int32)
    new_len = torch.tensor([3], dtype=torch.int32)
    dev = device_for(backend)
    x_out, size_out = dk.scatter_merge(x.to(dev), size.to(dev), row_map.to(dev), new_len.to(dev), backend=backend)
    assert size_out.cpu().tolist() == [[1 + 2 + 3 + 1, 1, 1, 0, 0, 0]]
    expected = (1 * x[0, 0].float() + 2 * x[0, 1].float() + 3 * x[0, 2].float() + 1 * x[0, 4].float()) / 7
    assert torch.allclose(x_out[0, 0].cpu().float(), expected.to(dtype).float(), rtol=1e-2)
    assert (x_out[0, 3:].cpu() == 0).all()


@pytest.mark.parametrize("backend", backend_params("dtome_merge"))
def test_dtome_merge_is_deterministic(backend):
    x, metric, size, lengths = make_inputs(3, 31, 16, 24, torch.float32, [31, 20, 9], seed=3)
    dev = device_for(backend)
    args = (x.to(dev), metric.to(dev), size.to(dev), lengths.to(dev), 0.2)
    first = dk.dtome_merge(*args, protect_first=True, backend=backend)
    for _ in range(2):
        again = dk.dtome_merge(*args, protect_first=True, backend=backend)
        for a, b in zip(first, again):
            if a is not None:
                assert torch.equal(a, b)


# ---------------------------------------------------------------- properties of the reference


def test_threshold_inf_merges_nothing_and_keeps_every_row():
    x, metric, size, lengths = make_inputs(2, 17, 8, 8, torch.float32, [17, 10])
    res = dk.dtome_merge(x, metric, size, lengths, math.inf, backend="reference")
    assert torch.equal(res.lengths, lengths)
    for b, t in enumerate(lengths.tolist()):
        new_rows = res.row_map[b, :t].long()
        assert torch.equal(torch.sort(new_rows).values, torch.arange(t)), "a permutation of the rows"
        assert torch.allclose(res.x[b, new_rows], x[b, :t], rtol=1e-6)
        assert torch.equal(res.size[b, new_rows], size[b, :t])


def test_threshold_minus_inf_merges_up_to_the_cap():
    x, metric, size, lengths = make_inputs(4, 21, 8, 8, torch.float32, [21, 20, 3, 1])
    for protect in (False, True):
        res = dk.dtome_merge(x, metric, size, lengths, -math.inf, protect_first=protect, backend="reference")
        p = int(protect)
        expected = [t - max((t - p) // 2, 0) for t in lengths.tolist()]
        assert res.lengths.tolist() == expected


def test_sizes_sum_to_the_original_count():
    x, metric, _, lengths = make_inputs(3, 40, 16, 8, torch.float32, [40, 25, 2])
    size = torch.ones(3, 40)
    res = dk.dtome_merge(x, metric, size, lengths, 0.3, backend="reference")
    assert torch.equal(res.size.sum(-1), lengths.float())
    res2 = dk.dtome_merge(res.x, poison_padding(res.x[..., :16], res.lengths), res.size, res.lengths, 0.3, backend="reference")
    assert torch.equal(res2.size.sum(-1), lengths.float())


def test_pos_map_composes_over_steps():
    x, metric, size, lengths = make_inputs(2, 24, 8, 8, torch.float32, [24, 15], centres=2)
    pos = torch.arange(24, dtype=torch.int32).repeat(2, 1)
    pos = torch.where(pos < lengths[:, None], pos, -1)
    step1 = dk.dtome_merge(x, metric, size, lengths, 0.2, pos_map=pos, backend="reference")
    m2 = poison_padding(step1.x[..., :8], step1.lengths)
    step2 = dk.dtome_merge(step1.x, m2, step1.size, step1.lengths, 0.2, pos_map=step1.pos_map, backend="reference")
    for b in range(2):
        for p in range(24):
            if p >= lengths[b]:
                assert step2.pos_map[b, p] == -1
            else:
                assert step2.pos_map[b, p] == step2.row_map[b, step1.row_map[b, p]]
    # every kept row is the image of some original token
    for b in range(2):
        covered = set(step2.pos_map[b][step2.pos_map[b] >= 0].tolist())
        assert covered == set(range(int(step2.lengths[b])))


def test_protected_first_row_stays_first():
    x, metric, size, lengths = make_inputs(2, 13, 8, 8, torch.float32, [13, 6], centres=1)
    res = dk.dtome_merge(x, metric, size, lengths, -math.inf, protect_first=True, backend="reference")
    assert (res.row_map[:, 0] == 0).all()
    assert torch.equal(res.x[:, 0], x[:, 0])


def test_padding_nan_never_reaches_outputs():
    x, metric, size, lengths = make_inputs(2, 10, 8, 8, torch.float32, [7, 0])
    size = poison_padding(size, lengths)
    res = dk.dtome_merge(x, metric, size, lengths, 0.0, backend="reference")
    assert not res.x.isnan().any() and not res.size.isnan().any()
    assert res.lengths.tolist()[1] == 0 and (res.row_map[1] == -1).all()


def test_batch_threshold_lets_r_edges_pass():
    g = torch.Generator().manual_seed(5)
    metric = clustered_metric(4, 50, 16, centres=4, noise=0.5, generator=g)
    node_max, _ = dk.bipartite_similarity(metric, protect_first=True)
    tau = dk.batch_threshold(node_max, 5)
    assert tau.dim() == 0 and tau.dtype == torch.float32
    assert int((node_max > tau).sum()) == 4 * 5
    assert float(dk.batch_threshold(node_max, node_max.shape[1])) == 0.0  # r = M: fewer than B*r + 1 scores
    with pytest.raises(ValueError, match="r must"):
        dk.batch_threshold(node_max, 10**6)  # r outside [0, M]
    assert float(dk.batch_threshold(torch.full((2, 3), -0.5), 1)) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    bsz=st.integers(1, 3), n=st.integers(1, 24), c=st.sampled_from([1, 3, 8]),
    protect=st.booleans(), quantile=st.floats(0, 1), data=st.data(),
)
def test_reference_matches_oracle_randomised(bsz, n, c, protect, quantile, data):
    lens = [data.draw(st.integers(0, n)) for _ in range(bsz)]
    x, metric, size, lengths = make_inputs(bsz, n, c, 5, torch.float32, lens, seed=n * 7 + c)
    *_, node_max = dtome_oracle(x, metric, size, lengths, math.inf, protect)
    tau = away_from_ties(node_max, quantile)
    x_ref, size_ref, row_map_ref, len_ref, _ = dtome_oracle(x, metric, size, lengths, tau, protect)
    res = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=protect, backend="reference")
    assert torch.equal(res.row_map, row_map_ref) and torch.equal(res.lengths, len_ref)
    assert torch.allclose(res.x.double(), x_ref, atol=1e-5)
