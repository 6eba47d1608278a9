"""Triton DToMe backend beyond the generic suite: larger shapes, several tiles / chunks per
kernel, strided inputs, exact ties across tiles, arbitrary scatter maps, long pos_maps.

Runs on CUDA tensors when present, else on CPU tensors under TRITON_INTERPRET=1 (shapes are
kept small enough for the interpreter).
"""

import math

import pytest
import torch

import dymu_kernels as dk
from conftest import backend_params, device_for
from helpers import assert_within_2x_torch, poison_padding
from oracle import dtome_oracle
from test_dtome import away_from_ties, make_inputs

TRITON = backend_params("dtome_merge")[2:]  # the triton param, with its skip marks
DEV = device_for("triton")


def _to(*tensors):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("protect_first", [False, True])
def test_merge_bf16_larger_shape_matches_oracle(backend, protect_first):
    bsz, n, c, d = 2, 70, 24, 40
    x, metric, size, lengths = make_inputs(bsz, n, c, d, torch.bfloat16, [70, 53], seed=11, centres=4)
    *_, node_max = dtome_oracle(x, metric, size, lengths, math.inf, protect_first)
    tau = away_from_ties(node_max, 0.4)
    x_ref, size_ref, row_map_ref, len_ref, _ = dtome_oracle(x, metric, size, lengths, tau, protect_first)
    pos_map = torch.arange(n, dtype=torch.int32).repeat(bsz, 1)
    pos_map = torch.where(pos_map < lengths[:, None], pos_map, -1)
    res = dk.dtome_merge(*_to(x, metric, size, lengths), tau, pos_map=pos_map.to(DEV), protect_first=protect_first, backend=backend)
    assert torch.equal(res.lengths.cpu(), len_ref)
    assert torch.equal(res.row_map.cpu(), row_map_ref)
    assert torch.equal(res.pos_map.cpu(), torch.where(pos_map >= 0, row_map_ref, -1))
    assert torch.equal(res.size.cpu(), size_ref.float())
    assert res.x.dtype == torch.bfloat16
    assert_within_2x_torch(res.x.cpu(), x_ref.to(torch.bfloat16), x_ref, floor=1e-5)
    assert 0 < int(len_ref.min()) and int((lengths - len_ref).min()) > 0, "the case should merge something"


@pytest.mark.parametrize("backend", TRITON)
def test_strided_metric_and_x(backend):
    bsz, n, c, d = 2, 37, 20, 24
    x, metric, size, lengths = make_inputs(bsz, n, c, d, torch.float16, [37, 30], seed=4)
    # metric as a column slice of a wider tensor (like keys sliced out of qkv), x transposed storage
    wide = torch.randn(bsz, n, 3 * c, dtype=torch.float16)
    wide[..., c : 2 * c] = metric
    metric_strided = wide[..., c : 2 * c]
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not metric_strided.is_contiguous() and not x_strided.is_contiguous()
    tau = 0.3
    ref = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="reference")
    a = _to(x_strided, metric_strided.to(DEV), size, lengths)
    res = dk.dtome_merge(*a, tau, protect_first=True, backend=backend)
    assert torch.equal(res.row_map.cpu(), ref.row_map) and torch.equal(res.lengths.cpu(), ref.lengths)
    assert torch.equal(res.size.cpu(), ref.size)
    assert torch.allclose(res.x.cpu().float(), ref.x.float(), atol=2e-3, rtol=2e-3)
    # and the metric transposed in memory ([B, C, N] storage)
    metric_t = metric.transpose(1, 2).contiguous().transpose(1, 2)
    nm, ni = dk.bipartite_similarity(metric_t.to(DEV), lengths.to(DEV), backend=backend)
    nm_ref, ni_ref = dk.bipartite_similarity(metric, lengths, backend="reference")
    assert torch.equal(ni.cpu(), ni_ref) and torch.allclose(nm.cpu(), nm_ref, atol=1e-6)


@pytest.mark.parametrize("backend", TRITON)
def test_similarity_several_tiles_and_exact_ties(backend):
    # N = 150: 75 sources and 75 destinations, two tiles of 64 each way.
    bsz, n, c = 2, 150, 20
    g = torch.Generator().manual_seed(2)
    metric = torch.randn(bsz, n, c, generator=g)
    # destination rows 3 and 131 (columns 1 and 65: different tiles) are identical and are the
    # best match of source 10: the tie goes to the smaller row, 3.
    metric[:, 131] = metric[:, 3]
    metric[:, 10] = metric[:, 3] * 2.0
    lengths = torch.tensor([150, 140], dtype=torch.int32)
    metric = poison_padding(metric, lengths)
    nm, ni = dk.bipartite_similarity(metric.to(DEV), lengths.to(DEV), protect_first=True, backend=backend)
    nm_ref, ni_ref = dk.bipartite_similarity(metric, lengths, protect_first=True, backend="reference")
    finite = torch.isfinite(nm_ref)
    assert torch.equal(torch.isfinite(nm.cpu()), finite)
    assert torch.allclose(nm.cpu()[finite], nm_ref[finite], atol=1e-6)
    # index decisions away from near-ties of the runner-up
    top2 = torch.nn.functional.normalize(metric.nan_to_num(), dim=-1)
    scores = top2[:, 0::2] @ top2[:, 1::2].transpose(1, 2)
    scores = scores.masked_fill(~(torch.arange(1, n, 2) < lengths[:, None])[:, None, :], -math.inf)
    best2 = scores.topk(2, dim=-1).values
    clear = finite & ((best2[..., 0] - best2[..., 1]) > 1e-5)
    assert torch.equal(ni.cpu()[clear], ni_ref[clear])
    assert ni.cpu()[:, 5].tolist() == [3, 3] and ni_ref[:, 5].tolist() == [3, 3]
    assert nm.cpu()[:, 0].tolist() == [-math.inf, -math.inf] and ni.cpu()[:, 0].tolist() == [-1, -1]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("protect_first", [False, True])
def test_select_edges_many_chunks(backend, protect_first):
    # 1251 sources: two chunks of 1024 in the selection kernel. The cap bites for image 0
    # (odd t, -inf threshold when unprotected); the weakest score is tied between a source in
    # each chunk, and the smaller row (in the first chunk) must stay.
    n = 2501
    num_src = (n + 1) // 2
    g = torch.Generator().manual_seed(9)
    node_max = torch.rand(3, num_src, generator=g)
    node_max[0, 1100] = node_max[0, 50] = -0.5  # the weakest, tied across chunks
    node_idx = (2 * torch.randint(0, n // 2, (3, num_src), generator=g) + 1).to(torch.int32)
    lengths = torch.tensor([2501, 2200, 1500], dtype=torch.int32)
    valid = 2 * torch.arange(num_src) < lengths[:, None]
    node_max = torch.where(valid, node_max, -math.inf)
    node_idx = torch.where(valid, node_idx, -1)
    if protect_first:
        node_max[:, 0], node_idx[:, 0] = -math.inf, -1
    tau = torch.tensor([-math.inf, 0.5, 0.9])
    ref = dk.select_edges(node_max, node_idx, lengths, tau, n, protect_first=protect_first, backend="reference")
    out = dk.select_edges(*_to(node_max, node_idx, lengths, tau), n, protect_first=protect_first, backend=backend)
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
    if not protect_first:
        assert int(ref[0][0, 2 * 50]) == 0 and int(ref[1][0]) == n - n // 2, "the weakest source stays"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scatter_merge_arbitrary_map(backend, dtype):
    # Not a DToMe map: many rows into one output row, rows out of order, unused rows.
    bsz, n, d = 2, 23, 36
    g = torch.Generator().manual_seed(6)
    x = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.rand(bsz, n, generator=g) * 3
    row_map = torch.randint(0, 5, (bsz, n), generator=g).to(torch.int32)
    row_map[0, 12:] = 0  # eleven rows into row 0
    row_map[1, ::3] = -1
    new_len = torch.tensor([5, 5], dtype=torch.int32)
    x = torch.where(row_map[..., None] >= 0, x, float("nan")).to(dtype)  # unmapped rows: NaN
    x_ref, s_ref = dk.scatter_merge(x, size, row_map, new_len, backend="reference")
    x_out, s_out = dk.scatter_merge(*_to(x, size, row_map, new_len), backend=backend)
    # Non-integer sizes: the kernel sums a row's sources in a segmented scan (a fixed tree, not
    # index order), so the fp32 sums agree to rounding; integer counts (DToMe's sizes) are exact.
    assert torch.allclose(s_out.cpu(), s_ref, rtol=1e-6, atol=0)
    assert not x_out.cpu().isnan().any()
    assert torch.allclose(x_out.cpu().float(), x_ref.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert (x_out.cpu()[:, 5:] == 0).all() and (s_out.cpu()[:, 5:] == 0).all()


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("n, d", [(6, 8), (40, 300)], ids=["one-program", "five-programs"])
def test_long_pos_map(backend, n, d):
    # N0 = 230 original positions over N rows: the merge programs stride over pos_map blocks
    # (D = 300 gives 8 output rows per program, so 5 programs per image for N = 40).
    bsz, c, n0 = 2, 4, 230
    x, metric, size, lengths = make_inputs(bsz, n, c, d, torch.float32, [n, n - 1], seed=1)
    g = torch.Generator().manual_seed(3)
    pos_map = torch.randint(-1, n, (bsz, n0), generator=g).to(torch.int32)
    pos_map = torch.where(pos_map < lengths[:, None], pos_map, -1)
    ref = dk.dtome_merge(x, metric, size, lengths, -math.inf, pos_map=pos_map, backend="reference")
    res = dk.dtome_merge(*_to(x, metric, size, lengths), -math.inf, pos_map=pos_map.to(DEV), backend=backend)
    assert torch.equal(res.pos_map.cpu(), ref.pos_map) and torch.equal(res.row_map.cpu(), ref.row_map)


@pytest.mark.parametrize("backend", TRITON)
def test_batch_threshold_matches_reference(backend):
    g = torch.Generator().manual_seed(8)
    node_max = torch.rand(3, 40, generator=g) * 2 - 0.5
    node_max[:, ::7] = -math.inf
    for r in (0, 3, 20, 40):  # 40 = M: fewer than B*r + 1 scores
        ref = dk.batch_threshold(node_max, r, backend="reference")
        out = dk.batch_threshold(node_max.to(DEV), r, backend=backend)
        assert out.shape == () and out.dtype == torch.float32 and float(out) == float(ref)


def test_compile_specs_match_kernel_signatures():
    from dymu_kernels.dtome import triton as tb

    assert tb.COMPILE_SPECS
    for spec in tb.COMPILE_SPECS:
        assert list(spec["signature"]) == list(spec["kernel"].arg_names), spec["name"]
        constexpr = {k for k, v in spec["signature"].items() if v == "constexpr"}
        assert constexpr == set(spec["constexprs"]), spec["name"]
        special = spec.get("specialize", {})
        for name in special.get("divisible_by_16", []) + special.get("equal_to_1", []):
            assert spec["signature"][name] != "constexpr", (spec["name"], name)
    # strides are specialised at run time (divisibility / == 1 hints); only sizes are not
    import inspect
    import re

    from dymu_kernels.dtome import triton_kernels as tk

    lists = re.findall(r"do_not_specialize=\[([^\]]*)\]", inspect.getsource(tk))
    assert len(lists) == 5 and not any("stride" in names for names in lists), lists


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("n, d", [(300, 20), (7, 2100)], ids=["rows-in-chunks", "features-in-chunks"])
def test_scatter_merge_several_chunks(backend, n, d):
    # N = 300: the row_map is scanned in two chunks; D = 2100: two feature blocks per row.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, n, d, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float()
    new_len = torch.tensor([n // 3, 1], dtype=torch.int32)
    row_map = torch.stack([torch.randint(0, n // 3, (n,), generator=g), torch.zeros(n, dtype=torch.long)]).to(torch.int32)
    row_map[0, : n // 3] = torch.arange(n // 3, dtype=torch.int32)  # every kept row is hit
    x_ref, s_ref = dk.scatter_merge(x, size, row_map, new_len, backend="reference")
    x_out, s_out = dk.scatter_merge(*_to(x, size, row_map, new_len), backend=backend)
    assert torch.equal(s_out.cpu(), s_ref)
    assert torch.allclose(x_out.cpu(), x_ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- GPU-fault fixes (issue 14)


def _backend():
    from dymu_kernels.dtome import triton as tb

    return tb


@pytest.mark.parametrize("backend", TRITON)
def test_lengths_past_n_are_clamped(backend):
    # Unvalidated lengths > N (and < 0) act as N (and 0), as the reference treats them: nothing
    # is read past the metric / x. Called on the backend directly (the op layer always
    # validates CPU tensors).
    tb = _backend()
    bsz, n, c, d = 3, 21, 16, 8
    x, metric, size, _ = make_inputs(bsz, n, c, d, torch.float32, [n] * bsz, seed=5)
    wild = torch.tensor([n + 1000, -7, n], dtype=torch.int32)
    clamped = wild.clamp(0, n)
    tau = torch.full((bsz,), 0.2)
    ref = dk.dtome_merge(x, metric, size, clamped, tau, protect_first=True, backend="reference")
    res = tb.dtome_merge(*_to(x, metric, size, wild, tau), None, True)
    assert torch.equal(res.lengths.cpu(), ref.lengths) and torch.equal(res.row_map.cpu(), ref.row_map)
    assert torch.allclose(res.x.cpu(), ref.x, atol=1e-6)
    nm, ni = tb.bipartite_similarity(*_to(metric, wild), False)
    nm_ref, ni_ref = dk.bipartite_similarity(metric, clamped, backend="reference")
    assert torch.equal(ni.cpu(), ni_ref) and torch.allclose(nm.cpu(), nm_ref, atol=1e-6)
    if DEV.type == "cuda":  # the public op with validation off takes the same path
        out = dk.dtome_merge(*_to(x, metric, size, wild), 0.2, protect_first=True, backend=backend, validate=False)
        assert torch.equal(out.row_map.cpu(), ref.row_map)


def _nan_rule_expectation(metric, lengths):
    """node_max / node_idx with the NaN rule: NaN scores never form an edge (float64)."""
    bsz, n, _ = metric.shape
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    dst_ok = (torch.arange(1, n, 2) < lengths[:, None])[:, None, :]
    scores = torch.where(dst_ok & ~scores.isnan(), scores, -math.inf)
    src_ok = torch.arange(0, n, 2) < lengths[:, None]
    best = scores.amax(-1)
    best = torch.where(src_ok, best, -math.inf)
    idx = torch.where(best > -math.inf, 2 * scores.argmax(-1) + 1, -1)
    return best, idx


@pytest.mark.parametrize("backend", TRITON)
def test_nan_metric_rows_never_form_edges(backend):
    bsz, n, c = 2, 41, 12
    g = torch.Generator().manual_seed(21)
    metric = torch.randn(bsz, n, c, generator=g)
    metric[0, 3, 5] = math.nan  # a destination with a NaN value: never chosen
    metric[0, 7, 0] = math.inf  # a destination with an inf value: its normalised row is NaN
    metric[0, 4, 2] = math.nan  # a source with a NaN value: all its scores NaN -> -inf, -1
    metric[1, 0::2] = math.nan  # image 1: every source all-NaN
    lengths = torch.tensor([n, 30], dtype=torch.int32)
    metric[1, 30:] = 5.0
    want_max, want_idx = _nan_rule_expectation(metric, lengths)
    nm, ni = dk.bipartite_similarity(metric.to(DEV), lengths.to(DEV), backend=backend)
    nm, ni = nm.cpu(), ni.cpu()
    assert not nm.isnan().any()
    assert nm[0, 2] == -math.inf and ni[0, 2] == -1  # source row 4
    assert (nm[1] == -math.inf).all() and (ni[1] == -1).all()
    assert not ((ni[0] == 3) | (ni[0] == 7)).any()
    finite = want_max > -math.inf
    assert torch.equal(nm > -math.inf, finite)
    assert torch.allclose(nm[finite].double(), want_max[finite], atol=1e-5)
    assert torch.equal(ni[finite], want_idx[finite].int())
    # and the whole step: a NaN score never merges, whatever the threshold
    x = torch.randn(bsz, n, 6, generator=g)
    res = dk.dtome_merge(*_to(x, metric, torch.ones(bsz, n), lengths), -math.inf, backend=backend)
    assert int(res.row_map[0, 4]) >= 0 and not res.x.cpu()[0, : int(res.lengths[0])].isnan().any()
    assert torch.equal(res.lengths.cpu()[1], lengths[1])  # image 1: nothing merged


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_flat_image_every_source_into_one_destination(backend, dtype):
    # A flat image: all rows identical, so every source picks row 1 (ties -> smallest row) and
    # one output row receives 31 sources: a run of one row's sorted sources across chunks.
    bsz, n, c, d = 1, 63, 16, 40
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(1, 1, c, generator=g).expand(bsz, n, c).to(dtype).contiguous()
    x = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.randint(1, 5, (bsz, n), generator=g).float()
    lengths = torch.tensor([n], dtype=torch.int32)
    ref = dk.dtome_merge(x, metric, size, lengths, 0.5, backend="reference")
    res = dk.dtome_merge(*_to(x, metric, size, lengths), 0.5, backend=backend)
    assert torch.equal(res.row_map.cpu(), ref.row_map) and torch.equal(res.lengths.cpu(), ref.lengths)
    assert int((ref.row_map[0, 0::2] == int(ref.row_map[0, 1])).sum()) == 31
    assert torch.equal(res.size.cpu(), ref.size)  # integer counts: exact in any order
    assert torch.allclose(res.x.cpu().float(), ref.x.float(), atol=2e-3 if dtype == torch.float16 else 1e-6)


def test_launches_are_guarded_by_the_tensors_device(monkeypatch):
    # Every launch runs inside _device_guard(tensor.device) (so Triton uses that device's
    # current stream), and for CUDA devices the guard is torch.cuda.device(that device).
    tb = _backend()
    entered = []
    real = tb._device_guard

    def spy(device):
        entered.append(device)
        return real(device)

    monkeypatch.setattr(tb, "_device_guard", spy)
    x, metric, size, lengths = make_inputs(2, 9, 4, 4, torch.float32, [9, 6], seed=2)
    tb.dtome_merge(*_to(x, metric, size, lengths), torch.full((2,), 0.1).to(DEV), None, False)
    assert entered and all(dev == x.to(DEV).device for dev in entered)
    assert len(entered) == 3  # similarity, selection, merge (the split combine shares a guard)

    seen = []

    class FakeCudaDevice:
        def __init__(self, device):
            seen.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with real(torch.device("cuda", 1)):
        pass
    assert seen == [torch.device("cuda", 1)]
    with real(torch.device("cpu")):  # CPU tensors (interpreter): no CUDA call at all
        pass
    assert seen == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu():
    dev = torch.device("cuda", 1)
    x, metric, size, lengths = make_inputs(2, 40, 16, 24, torch.float16, [40, 33], seed=3)
    ref = dk.dtome_merge(x, metric, size, lengths, 0.3, protect_first=True, backend="reference")
    assert torch.cuda.current_device() == 0
    stream = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(stream):  # a non-default current stream on cuda:1
        res = dk.dtome_merge(x.to(dev), metric.to(dev), size.to(dev), lengths.to(dev), 0.3,
                             protect_first=True, backend="triton")
    stream.synchronize()
    assert res.x.device == dev
    assert torch.equal(res.row_map.cpu(), ref.row_map) and torch.equal(res.lengths.cpu(), ref.lengths)
    assert torch.allclose(res.x.cpu().float(), ref.x.float(), atol=2e-3)


def test_similarity_grid_splits_destinations_when_small():
    tb = _backend()
    cfg = tb._similarity_config(577, 64, 1, torch.float16)
    programs = triton_cdiv(289, cfg["BLOCK_A"]) * cfg["splits"]
    assert programs >= 40, cfg  # was 5 programs at B = 1
    assert cfg["splits"] * cfg["dst_per_split"] >= 288 and cfg["dst_per_split"] % cfg["BLOCK_B"] == 0
    assert tb._similarity_config(577, 64, 64, torch.float16)["splits"] == 1
    # D = 1152 (SigLIP): 18 blocks of 64, no masked lane; D = 1024: 16 of 64; D = 96: 3 of 32
    assert tb._merge_config(729, 1152)["BLOCK_D"] == 64 and tb._merge_config(577, 1024)["BLOCK_D"] == 64
    assert tb._merge_config(577, 96)["BLOCK_D"] == 32


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("backend", TRITON)
def test_batch_threshold_counts_nan_as_minus_inf(backend):
    # unvalidated NaN scores (validation is off by default for GPU tensors): NaN acts as -inf
    tb = _backend()
    node_max = torch.tensor([[0.9, math.nan, 0.5, 0.2], [math.nan, 0.7, -math.inf, 0.4]])
    as_inf = torch.where(node_max.isnan(), -math.inf, node_max)
    for r in (0, 1, 2, 3):
        want = dk.batch_threshold(as_inf, r, backend="reference")
        got = tb.batch_threshold(node_max.to(DEV), r)
        assert float(got) == float(want), r


@pytest.mark.parametrize("shape, dtype", [((577, 64, 1024, True), torch.float16), ((729, 72, 1152, False), torch.float32),
                                          ((577, 64, 1024, True), torch.bfloat16)], ids=["CLIP-fp16", "SigLIP-fp32", "CLIP-bf16"])
def test_compile_specs_cover_what_the_launchers_run(monkeypatch, shape, dtype):
    # The launchers' real block sizes, warps and stages at the model shapes are compiled by the
    # compile check, and its runtime variants claim no specialisation the arguments lack.
    tb = _backend()
    monkeypatch.setattr(tb, "triton_interpreting", lambda: False)  # the GPU configuration
    n, c, d, cls = shape
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
            return launch

    for name in ("similarity_kernel", "similarity_combine_kernel", "select_kernel", "group_rows_kernel", "merge_kernel"):
        monkeypatch.setattr(tb, name, Recorder(getattr(tb, name)))
    x = torch.zeros(1, n, d, dtype=dtype)
    metric = torch.zeros(1, n, c, dtype=dtype)
    tb.dtome_merge(x, metric, torch.ones(1, n), torch.full((1,), n, dtype=torch.int32), torch.zeros(1),
                   torch.zeros(1, n, dtype=torch.int32), cls)
    assert len(launches) == 5  # B = 1: the destination split is on
    for kernel, args, kwargs in launches:
        kwargs = {k: v for k, v in kwargs.items() if k != "BF16_BY_BITS"}
        names = list(kernel.arg_names)
        values = dict(zip(names, args))
        matches = [s for s in tb.COMPILE_SPECS if s["kernel"] is kernel and "any strides" not in s["name"]
                   and s["num_warps"] == kwargs.get("num_warps", 4) and s["num_stages"] == kwargs.get("num_stages", 3)
                   and all(s["constexprs"].get(k) == v for k, v in kwargs.items() if k not in ("num_warps", "num_stages"))]
        ptr_type = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
        data = next((k for k in ("metric_ptr", "x_ptr") if k in names), None)
        if data is not None:  # the kernels that read activations: the variant of this dtype
            matches = [s for s in matches if s["signature"][data] == ptr_type]
        assert matches, (kernel.__name__, kwargs)
        for spec in matches:
            special = spec.get("specialize", {})
            for arg in special.get("equal_to_1", []):
                assert values[arg] == 1, (spec["name"], arg)
            for arg in special.get("divisible_by_16", []):
                value = values[arg]
                assert (value.data_ptr() % 16 == 0) if isinstance(value, torch.Tensor) else value % 16 == 0, (spec["name"], arg)


# ----------------------------------------------------------------------------- segmented merge tail


def _merge_chunk() -> int:
    """Positions of order the merge kernel walks per step in this process (interpreter: 16)."""
    from dymu_kernels._backends import triton_interpreting

    return _backend()._merge_config(8, 8, triton_interpreting())["CHUNK"]


@pytest.mark.parametrize("backend", TRITON)
def test_scatter_merge_one_destination_owns_many_chunks(backend):
    # Every row of image 0 into output row 3 (owned by the first program): its run spans many
    # chunks, carried from step to step; image 1 sends 70 rows into row 40 (the second
    # program's first row), the rest one to one, so runs start mid-chunk too.
    chunk = _merge_chunk()
    n, d = max(5 * chunk + 7, 90), 12
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, n, d, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float()
    row_map = torch.stack([torch.full((n,), 3), torch.arange(n)]).to(torch.int32)
    row_map[1, 5:75] = 40
    new_len = torch.tensor([4, n], dtype=torch.int32)
    x_ref, s_ref = dk.scatter_merge(x, size, row_map, new_len, backend="reference")
    x_out, s_out = dk.scatter_merge(*_to(x, size, row_map, new_len), backend=backend)
    assert int((row_map[0] == 3).sum()) > 4 * chunk
    assert torch.equal(s_out.cpu(), s_ref)  # integer sizes: exact in any order
    assert torch.allclose(x_out.cpu(), x_ref, atol=1e-6, rtol=1e-5)
    assert (x_out.cpu()[0, :3] == 0).all() and (x_out.cpu()[0, 4:] == 0).all() and (s_out.cpu()[0, 4:] == 0).all()


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_scatter_merge_rows_with_zero_one_and_many_sources(backend, dtype):
    # Output rows with no source (zero, size 0) between rows with one and with many sources,
    # over three programs of 32 rows; non-integer sizes; unmapped rows hold NaN.
    n, d = 75, 20
    g = torch.Generator().manual_seed(32)
    row_map = torch.full((n,), -1, dtype=torch.int32)
    row_map[0:20] = 2  # many
    row_map[20] = 5  # one
    row_map[21:24] = 0  # a few
    row_map[24:60:2] = torch.arange(33, 69, 2, dtype=torch.int32)  # one each, every other row
    row_map[25:61:2] = 70  # many, in the third program, interleaved in index order
    row_map = row_map[None].repeat(2, 1)
    row_map[1] = row_map[1].flip(0)  # sources out of index order
    x = torch.randn(2, n, d, generator=g)
    x = torch.where(row_map[..., None] >= 0, x, float("nan")).to(dtype)
    size = torch.rand(2, n, generator=g) * 3 + 0.25
    new_len = torch.tensor([n, n], dtype=torch.int32)
    x_ref, s_ref = dk.scatter_merge(x, size, row_map, new_len, backend="reference")
    x_out, s_out = dk.scatter_merge(*_to(x, size, row_map, new_len), backend=backend)
    x_out, s_out = x_out.cpu(), s_out.cpu()
    assert not x_out.isnan().any() and not s_out.isnan().any()
    assert torch.allclose(s_out, s_ref, rtol=1e-6, atol=0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(x_out.float(), x_ref.float(), atol=tol, rtol=tol)
    hits = torch.zeros(2, n + 1).scatter_add_(1, torch.where(row_map >= 0, row_map, n).long(), torch.ones(2, n))
    hit = hits[:, :n] > 0
    assert (x_out[~hit] == 0).all() and (s_out[~hit] == 0).all() and int((~hit).sum()) > 10


@pytest.mark.parametrize("backend", TRITON)
def test_merge_is_bit_identical_run_to_run(backend):
    bsz, n, c, d = 2, 45, 8, 24
    x, metric, size, lengths = make_inputs(bsz, n, c, d, torch.float32, [45, 38], seed=33)
    size = size * 0.37  # non-integer sizes: the order of the sums shows in the bits
    a = dk.dtome_merge(*_to(x, metric, size, lengths), -math.inf, backend=backend)
    b = dk.dtome_merge(*_to(x, metric, size, lengths), -math.inf, backend=backend)
    for u, w in zip(a, b):
        if u is not None:
            assert torch.equal(u.view(torch.int32) if u.is_floating_point() else u,
                               w.view(torch.int32) if w.is_floating_point() else w)
    row_map = torch.randint(0, 3, (bsz, n), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    u = dk.scatter_merge(*_to(x.nan_to_num(), size, row_map, lengths), backend=backend)
    w = dk.scatter_merge(*_to(x.nan_to_num(), size, row_map, lengths), backend=backend)
    assert torch.equal(u[0].view(torch.int32), w[0].view(torch.int32)) and torch.equal(u[1], w[1])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("n", [1, 2, 3, 45, 71], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("protect_first", [False, True])
def test_merge_odd_n_and_one_token(backend, n, protect_first):
    # odd N (the cap rule), N = 1 (one token: nothing to merge) and N = 2, at -inf (everything
    # that may merge does), with one image shorter than N.
    x, metric, size, lengths = make_inputs(2, n, 8, 10, torch.float32, [n, max(n - 2, 1)], seed=34)
    ref = dk.dtome_merge(x, metric, size, lengths, -math.inf, protect_first=protect_first, backend="reference")
    res = dk.dtome_merge(*_to(x, metric, size, lengths), -math.inf, protect_first=protect_first, backend=backend)
    assert torch.equal(res.row_map.cpu(), ref.row_map) and torch.equal(res.lengths.cpu(), ref.lengths)
    assert torch.equal(res.size.cpu(), ref.size)
    assert torch.allclose(res.x.cpu(), ref.x, atol=1e-6, rtol=1e-5)
    if n == 1:
        assert res.lengths.tolist() == [1, 1] and torch.allclose(res.x.cpu()[:, 0], x[:, 0], atol=1e-6, rtol=1e-6)
