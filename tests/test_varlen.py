"""Packed variable-length ops (issue 12): dtome_merge_varlen and proportional_attention_varlen.

Oracles: the padded ``dtome_merge`` reference image by image (packed must equal padded), and a
float64 per-image loop for the attention (flash-attention's 2x-PyTorch rule). Capacity rows past
the total hold NaN in every input; outputs are poisoned by conftest, so an unwritten row fails.
"""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dymu_kernels as dk
from conftest import backend_params, device_for
from helpers import assert_within_2x_torch, clustered_metric

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pack(padded: torch.Tensor, lengths, capacity_extra: int = 3) -> torch.Tensor:
    """Rows [0, lengths[b]) of every image concatenated, then capacity_extra NaN (or -7) rows."""
    parts = [padded[b, :n] for b, n in enumerate(lengths)]
    fill = float("nan") if padded.is_floating_point() else -7
    parts.append(torch.full((capacity_extra, *padded.shape[2:]), fill, dtype=padded.dtype))
    return torch.cat(parts)


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def make_batch(lengths, n, c, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bsz = len(lengths)
    metric = clustered_metric(bsz, n, c, centres=3, noise=0.3, dtype=dtype, generator=g)
    x = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.randint(1, 4, (bsz, n), generator=g).float()
    return x, metric, size


CASES = [
    # (N, C, D, lengths): one-token and all-N images in one batch, empty images, odd/even lengths
    (16, 8, 12, [16, 1, 11]),
    (15, 16, 8, [15, 0, 7, 15]),
    (1, 4, 4, [1, 1]),
    (2, 4, 4, [2, 1]),
    (33, 32, 20, [33, 32, 2]),
]


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-" + "_".join(map(str, c[3])))
@pytest.mark.parametrize("protect_first", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tau", [0.3, math.inf, -math.inf, "per_image"])
@pytest.mark.parametrize("bound", [None, "longest"])
def test_merge_varlen_equals_padded(backend, case, protect_first, dtype, tau, bound):
    n, c, d, lens = case
    bsz = len(lens)
    x, metric, size = make_batch(lens, n, c, d, dtype)
    lengths = torch.tensor(lens, dtype=torch.int32)
    threshold = torch.linspace(-0.5, 0.9, bsz) if tau == "per_image" else tau
    pos_padded = torch.arange(n, dtype=torch.int32).expand(bsz, n).contiguous()
    pos_padded = torch.where(pos_padded < lengths[:, None], pos_padded, -1)
    ref = dk.dtome_merge(x, metric, size, lengths, threshold, pos_map=pos_padded, protect_first=protect_first,
                         backend="reference")
    cu = cu_of(lens)
    pos_packed = torch.where(pos_padded >= 0, pos_padded + cu[:-1, None], -1)
    device = device_for(backend)
    args = [pack(t, lens) for t in (x, metric, size)]
    res = dk.dtome_merge_varlen(*[a.to(device) for a in args], cu.to(device),
                                threshold.to(device) if torch.is_tensor(threshold) else threshold,
                                pos_map=pos_packed.to(device), protect_first=protect_first,
                                max_seqlen=max(max(lens), 1) if bound else None, backend=backend)
    res = type(res)(*[t.cpu() if t is not None else None for t in res])
    total = args[0].shape[0]
    assert res.x.shape == (total, d) and res.x.dtype == dtype and res.size.shape == (total,)
    assert res.cu_seqlens.dtype == torch.int32 and res.row_map.shape == (total,)
    new_cu = res.cu_seqlens
    assert (new_cu[1:] - new_cu[:-1]).tolist() == ref.lengths.tolist()
    for b, t in enumerate(lens):
        lo, hi, kept = int(new_cu[b]), int(new_cu[b + 1]), int(ref.lengths[b])
        torch.testing.assert_close(res.x[lo:hi], ref.x[b, :kept], atol=1e-6, rtol=1e-5)
        assert torch.equal(res.size[lo:hi], ref.size[b, :kept])
        rm = res.row_map[int(cu[b]):int(cu[b]) + t]
        assert torch.equal(rm - lo, ref.row_map[b, :t])
        expected_pos = torch.where(ref.pos_map[b] >= 0, ref.pos_map[b] + lo, -1)
        assert torch.equal(res.pos_map[b], expected_pos)
    end = int(new_cu[-1])
    assert torch.all(res.x[end:] == 0) and torch.all(res.size[end:] == 0)
    assert torch.all(res.row_map[int(cu[-1]):] == -1)


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen"))
def test_merge_varlen_packed_pos_map_and_defaults(backend):
    """pos_map may be a flat [T0] map; size=None means ones; deterministic run to run."""
    lens = [9, 4]
    x, metric, _ = make_batch(lens, 9, 8, 6, torch.float32, seed=3)
    device = device_for(backend)
    xp, mp = pack(x, lens, 0).to(device), pack(metric, lens, 0).to(device)
    cu = cu_of(lens).to(device)
    flat = torch.arange(13, dtype=torch.int64, device=device)
    a = dk.dtome_merge_varlen(xp, mp, None, cu, 0.2, pos_map=flat, backend=backend)
    b = dk.dtome_merge_varlen(xp, mp, None, cu, 0.2, pos_map=flat, backend=backend)
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert torch.equal(a.pos_map, a.row_map)
    assert float(a.size.sum()) == 13.0


def _attention_inputs(lens, heads, dim, dtype, seed=0, extra=2):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens) + extra
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(dtype) for _ in range(3))
    size = torch.randint(1, 5, (total,), generator=g).float()
    for t in (q, k, v, size):
        t[sum(lens):] = float("nan")
    return q, k, v, size, cu_of(lens)


def _attention_loop(q, k, v, size, lens, scale, dtype):
    """Per-image attention with the log-size bias, computed in ``dtype`` (float64 = the oracle)."""
    out = torch.zeros(q.shape, dtype=dtype)
    start = 0
    for n in lens:
        if n:
            qi, ki, vi = (t[start:start + n].to(dtype).transpose(0, 1) for t in (q, k, v))
            logits = (qi @ ki.transpose(1, 2)) * scale + size[start:start + n].to(dtype).log()
            out[start:start + n] = (torch.softmax(logits, dim=-1) @ vi).transpose(0, 1)
        start += n
    return out


ATTN_CASES = [([5, 1, 12], 2, 8), ([1], 1, 4), ([16, 0, 16, 3], 3, 16), ([40, 7], 2, 64)]


@pytest.mark.parametrize("backend", backend_params("proportional_attention_varlen"))
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "_".join(map(str, c[0])) + f"-D{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_varlen_vs_float64_loop(backend, case, dtype):
    lens, heads, dim = case
    q, k, v, size, cu = _attention_inputs(lens, heads, dim, dtype)
    scale = dim**-0.5
    device = device_for(backend)
    out = dk.proportional_attention_varlen(*(t.to(device) for t in (q, k, v, size, cu)), backend=backend).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    total = sum(lens)
    assert torch.all(out[total:] == 0)
    oracle = _attention_loop(q, k, v, size, lens, scale, torch.float64)
    plain = _attention_loop(q, k, v, size, lens, scale, dtype)
    assert_within_2x_torch(out[:total], plain[:total], oracle[:total], floor=1e-5)
    if backend != "reference":
        ref = dk.proportional_attention_varlen(q, k, v, size, cu, backend="reference")
        assert_within_2x_torch(out[:total], ref[:total], oracle[:total], floor=1e-5)


@pytest.mark.parametrize("backend", backend_params("proportional_attention_varlen"))
def test_attention_varlen_equals_padded_sdpa_and_is_deterministic(backend):
    """What the padded encoder runs (SDPA with the float log-size mask) image by image."""
    lens, heads, dim = [7, 3, 10], 2, 8
    q, k, v, size, cu = _attention_inputs(lens, heads, dim, torch.float32, seed=5)
    device = device_for(backend)
    a = dk.proportional_attention_varlen(*(t.to(device) for t in (q, k, v, size, cu)), scale=0.3, backend=backend)
    b = dk.proportional_attention_varlen(*(t.to(device) for t in (q, k, v, size, cu)), scale=0.3, backend=backend)
    assert torch.equal(a, b)
    start = 0
    for n in lens:
        qi, ki, vi = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        bias = size[start:start + n].log()[None, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=bias, scale=0.3)
        torch.testing.assert_close(a[start:start + n].cpu(), want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        start += n


# ------------------------------------------------------------------ bad inputs


def _merge_args():
    x = torch.randn(6, 4)
    return x, torch.randn(6, 4), torch.ones(6)


@pytest.mark.parametrize(
    "cu, error, words",
    [
        (torch.tensor([0, 4, 2], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), ValueError, "exceeds"),
        (torch.tensor([1, 3, 6], dtype=torch.int32), ValueError, "cu_seqlens[0]"),
        (torch.tensor([0, 3, 6], dtype=torch.int64), TypeError, "int32"),
        (torch.tensor([6], dtype=torch.int32), ValueError, "[B + 1]"),
        ([0, 3, 6], TypeError, "cu_seqlens"),
    ],
)
def test_bad_cu_seqlens_rejected(cu, error, words):
    x, metric, size = _merge_args()
    with pytest.raises(error, match=None) as info:
        dk.dtome_merge_varlen(x, metric, size, cu, 0.5)
    assert words in str(info.value) and "cu_seqlens" in str(info.value)
    q = torch.randn(6, 2, 4)
    with pytest.raises(error) as info:
        dk.proportional_attention_varlen(q, q, q, size, cu)
    assert words in str(info.value)


def test_bad_shapes_rejected():
    x, metric, size = _merge_args()
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="metric"):
        dk.dtome_merge_varlen(x, metric[:5], size, cu, 0.5)
    with pytest.raises(ValueError, match="size"):
        dk.dtome_merge_varlen(x, metric, size[:5], cu, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        dk.dtome_merge_varlen(x, metric, size, cu, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        dk.dtome_merge_varlen(x, metric, size, cu, float("nan"))
    with pytest.raises(ValueError, match="pos_map"):
        dk.dtome_merge_varlen(x, metric, size, cu, 0.5, pos_map=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="max_seqlen"):
        dk.dtome_merge_varlen(x, metric, size, cu, 0.5, max_seqlen=2)
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="one shape"):
        dk.proportional_attention_varlen(q, q[:, :1], q, size, cu)
    with pytest.raises(ValueError, match="head dim"):
        dk.proportional_attention_varlen(q[..., :3], q[..., :3], q[..., :3], size, cu)
    with pytest.raises(TypeError, match="dtype"):
        dk.proportional_attention_varlen(q, q.half(), q, size, cu)


# ------------------------------------------------------------------ no host sync


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen"))
def test_varlen_ops_under_fake_tensor_mode(backend):
    """No data-dependent host read (FakeTensorMode fails on one); real output shapes and dtypes."""
    if backend == "triton":
        pytest.skip("Triton launches need real tensors")
    with FakeTensorMode():
        x, metric, size = torch.randn(10, 6), torch.randn(10, 4), torch.ones(10)
        cu = torch.zeros(4, dtype=torch.int32)
        pos = torch.zeros(2, 5, dtype=torch.int32)
        res = dk.dtome_merge_varlen(x, metric, size, cu, 0.5, pos_map=pos, protect_first=True, backend=backend)
        assert res.x.shape == (10, 6) and res.cu_seqlens.shape == (4,) and res.pos_map.shape == (2, 5)
        res = dk.dtome_merge_varlen(x, metric, size, cu, 0.5, pos_map=pos, max_seqlen=4, backend=backend)
        assert res.x.shape == (10, 6) and res.row_map.shape == (10,) and res.pos_map.shape == (2, 5)
        assert res.row_map.dtype == torch.int32
        q = torch.randn(10, 2, 8)
        out = dk.proportional_attention_varlen(q, q, q, size, cu, backend=backend)
        assert out.shape == (10, 2, 8)


@pytest.mark.parametrize("backend", backend_params("proportional_attention_varlen"))
def test_attention_varlen_max_seqlen_bound(backend):
    """max_seqlen (a host bound on every image's length) gives the same result; a bound below a
    real length is rejected for CPU tensors."""
    lens = [20, 3, 17]
    q, k, v, size, cu = _attention_inputs(lens, 2, 16, torch.float32, seed=9)
    device = device_for(backend)
    args = [t.to(device) for t in (q, k, v, size, cu)]
    a = dk.proportional_attention_varlen(*args, backend=backend)
    b = dk.proportional_attention_varlen(*args, max_seqlen=20, backend=backend)
    if backend == "reference":  # dense [T, T] vs [B, W, W] scores: the same math in another summation order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_seqlen"):
        dk.proportional_attention_varlen(q, k, v, size, cu, max_seqlen=19, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen"):
        dk.proportional_attention_varlen(q, k, v, size, cu, max_seqlen=0, backend=backend)


def test_reference_on_meta_tensors():
    x, metric, size = torch.randn(10, 6, device="meta"), torch.randn(10, 4, device="meta"), torch.ones(10, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    res = dk.dtome_merge_varlen(x, metric, size, cu, 0.5, backend="reference")
    assert res.x.shape == (10, 6) and res.cu_seqlens.shape == (4,) and res.row_map.shape == (10,)
    q = torch.randn(10, 2, 8, device="meta", dtype=torch.bfloat16)
    out = dk.proportional_attention_varlen(q, q, q, size, cu, backend="reference")
    assert out.shape == (10, 2, 8) and out.dtype == torch.bfloat16


# ------------------------------------------------------------------ Triton reads the packed rows


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen")[2:])
def test_triton_merge_varlen_allocates_no_padded_batch(backend):
    """The Triton varlen merge works on the packed rows: no [B, max_seqlen, D] (or C) gather of
    x or metric is ever allocated (the profiler records every allocation the step makes)."""
    lens, width, c, d = [10, 2, 2], 10, 24, 16
    x, metric, size = make_batch(lens, width, c, d, torch.float32, seed=7)
    device = device_for(backend)
    xp, mp, sp = (pack(t, lens).to(device) for t in (x, metric, size))
    cu = cu_of(lens).to(device)
    num_rows = xp.shape[0]
    padded_bytes = min(len(lens) * width * d, len(lens) * width * c) * 4
    assert num_rows * d * 4 < padded_bytes  # x_out ([T, D]) is smaller than any padded gather
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        res = dk.dtome_merge_varlen(xp, mp, sp, cu, 0.1, max_seqlen=width, backend=backend)
    sizes = [max(e.self_cpu_memory_usage, getattr(e, "self_device_memory_usage", 0) or 0) for e in prof.events()]
    assert max(sizes) >= num_rows * d * 4, "the profiler should have seen x_out"
    assert max(sizes) < padded_bytes, sorted(sizes)[-5:]
    ref = dk.dtome_merge_varlen(xp.cpu(), mp.cpu(), sp.cpu(), cu.cpu(), 0.1, max_seqlen=width, backend="reference")
    assert torch.equal(res.row_map.cpu(), ref.row_map) and torch.equal(res.cu_seqlens.cpu(), ref.cu_seqlens)
    torch.testing.assert_close(res.x.cpu(), ref.x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen")[2:])
@pytest.mark.parametrize("bound", [None, "longest"])
def test_triton_merge_varlen_flat_images_runs_across_chunks(backend, bound):
    """Flat images (every source into one destination): long runs of sources cross the merge
    kernel's chunks, and images start mid-chunk in the packed scratch. Packed = padded."""
    lens, c, d = [41, 3, 36], 8, 20
    n = max(lens)
    g = torch.Generator().manual_seed(13)
    metric = torch.randn(len(lens), 1, c, generator=g).expand(len(lens), n, c).contiguous()
    x = torch.randn(len(lens), n, d, generator=g)
    size = torch.randint(1, 4, (len(lens), n), generator=g).float()
    lengths = torch.tensor(lens, dtype=torch.int32)
    ref = dk.dtome_merge(x, metric, size, lengths, 0.5, protect_first=True, backend="reference")
    assert int((ref.row_map[0, 2:41:2] == ref.row_map[0, 1]).sum()) == 20  # one run of 21 sources
    device = device_for(backend)
    cu = cu_of(lens)
    res = dk.dtome_merge_varlen(*[pack(t, lens).to(device) for t in (x, metric, size)], cu.to(device), 0.5,
                                protect_first=True, max_seqlen=n if bound else None, backend=backend)
    new_cu = res.cu_seqlens.cpu()
    assert (new_cu[1:] - new_cu[:-1]).tolist() == ref.lengths.tolist()
    for b, t in enumerate(lens):
        lo, hi = int(new_cu[b]), int(new_cu[b + 1])
        torch.testing.assert_close(res.x.cpu()[lo:hi], ref.x[b, :hi - lo], atol=1e-6, rtol=1e-5)
        assert torch.equal(res.size.cpu()[lo:hi], ref.size[b, :hi - lo])
        assert torch.equal(res.row_map.cpu()[int(cu[b]):int(cu[b]) + t] - lo, ref.row_map[b, :t])
    assert (res.x.cpu()[int(new_cu[-1]):] == 0).all() and (res.size.cpu()[int(new_cu[-1]):] == 0).all()


@pytest.mark.parametrize("backend", backend_params("dtome_merge_varlen")[2:])
def test_triton_merge_varlen_unvalidated_offsets_stay_in_bounds(backend):
    """Offsets past T or decreasing (unvalidated GPU inputs) act as clamped into [0, T] and made
    non-decreasing: the kernels read and write only the T rows; no batch at all (B = 0) works."""
    from dymu_kernels.varlen import triton as vt

    lens, c, d = [5, 4], 4, 6
    x, metric, size = make_batch(lens, 5, c, d, torch.float32, seed=2)
    device = device_for(backend)
    xp, mp, sp = (pack(t, lens, 0).to(device) for t in (x, metric, size))
    wild = torch.tensor([0, 7, 3, 40], dtype=torch.int32, device=device)  # T = 9
    tau = torch.full((3,), 0.2, device=device)
    res = vt.dtome_merge_varlen(xp, mp, sp, wild, tau, None, False, 0)
    clamped = torch.tensor([0, 7, 7, 9], dtype=torch.int32)
    want = dk.dtome_merge_varlen(xp.cpu(), mp.cpu(), sp.cpu(), clamped, 0.2, backend="reference")
    assert torch.equal(res.cu_seqlens.cpu(), want.cu_seqlens) and torch.equal(res.row_map.cpu(), want.row_map)
    torch.testing.assert_close(res.x.cpu(), want.x, atol=1e-6, rtol=1e-5)
    empty = vt.dtome_merge_varlen(xp, mp, sp, torch.zeros(1, dtype=torch.int32, device=device),
                                  torch.zeros(0, device=device), torch.arange(9, device=device, dtype=torch.int32),
                                  False, 0)
    assert empty.cu_seqlens.tolist() == [0] and (empty.x == 0).all() and (empty.size == 0).all()
    assert (empty.row_map == -1).all() and (empty.pos_map == -1).all()
