"""dk.vtu_decode_attention: decode attention over a merged KV cache (issue 11), every backend.

The oracle is a float64 loop over (image, head, query) restating the issue's formula; backends
must be within 2x of plain PyTorch's error in the same dtype (helpers.assert_within_2x_torch).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dymu_kernels as dk
from conftest import backend_params, device_for
from helpers import assert_within_2x_torch, onto_map, rope_tables
from oracle import vtu_oracle

BACKENDS = backend_params("vtu_decode_attention")


def decode_oracle(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths=None, scale=None):
    """The issue's formula in float64, one image, head and query at a time."""
    bsz, hq, tq, d = q.shape
    hkv = k_rows.shape[1]
    num_pos = pos_map.shape[1]
    scale = d**-0.5 if scale is None else scale
    half = d // 2
    out = torch.zeros(bsz, hq, tq, d, dtype=torch.float64)
    for b in range(bsz):
        length = num_pos if full_lengths is None else int(full_lengths[b])
        c = (cos[b] if cos.dim() == 3 else cos).double()
        s = (sin[b] if sin.dim() == 3 else sin).double()

        def rope(x, i):
            return x * c[i] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s[i]

        for h in range(hq):
            g = h // (hq // hkv)
            for t in range(tq):
                p = int(q_positions[b, t])
                keys = list(range(min(p + 1, length)))
                if not keys:
                    continue
                qt = rope(q[b, h, t].double(), p)
                logits = torch.stack([rope(k_rows[b, g, int(pos_map[b, j])].double(), j) @ qt * scale for j in keys])
                w = torch.softmax(logits, 0)
                vals = torch.stack([v_rows[b, g, int(pos_map[b, j])].double() for j in keys])
                out[b, h, t] = w @ vals
    return out


def make_case(bsz, hq, hkv, tq, num_rows, num_pos, d, dtype, seed=0, shared_rope=True, extra_rope=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, tq, d, generator=g).to(dtype)
    k_rows = torch.randn(bsz, hkv, num_rows, d, generator=g).to(dtype)
    v_rows = torch.randn(bsz, hkv, num_rows, d, generator=g).to(dtype)
    cos, sin = rope_tables(num_pos + extra_rope, d)
    if not shared_rope:
        cos, sin = cos.expand(bsz, -1, -1).contiguous(), sin.expand(bsz, -1, -1).contiguous()
    pos_map = onto_map(bsz, num_pos, num_rows, generator=g)
    q_positions = torch.randint(0, num_pos + extra_rope, (bsz, tq), generator=g).to(torch.int32)
    return q, k_rows, v_rows, cos, sin, pos_map, q_positions


def to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


CASES = {
    "mha_decode": (2, 4, 4, 1, 5, 13, 16),
    "gqa_multi_query": (2, 6, 2, 3, 7, 20, 32),
    "odd_dim": (1, 2, 1, 2, 3, 9, 10),
    "one_row": (1, 2, 2, 2, 1, 6, 8),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_oracle_within_2x_torch(backend, case, dtype):
    bsz, hq, hkv, tq, r, p, d = CASES[case]
    args = make_case(bsz, hq, hkv, tq, r, p, d, dtype, shared_rope=case != "gqa_multi_query")
    full_lengths = torch.tensor([p, p - 4][:bsz], dtype=torch.int32)
    oracle = decode_oracle(*args, full_lengths=full_lengths)
    device = device_for(backend)
    out = dk.vtu_decode_attention(*to(device, *args), full_lengths=full_lengths.to(device), backend=backend)
    assert out.shape == args[0].shape and out.dtype == dtype
    # plain PyTorch in the same dtype: the reference on inputs rounded to dtype, math in dtype
    torch_same = plain_torch(*args, full_lengths=full_lengths).to(dtype)
    assert_within_2x_torch(out.cpu(), torch_same, oracle, floor=1e-5 if dtype == torch.float32 else 2e-3)


def plain_torch(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths):
    """Gather + RoPE + masked softmax in the inputs' dtype (what a PyTorch user would write)."""
    dtype = q.dtype
    bsz, hq, tq, d = q.shape
    hkv = k_rows.shape[1]
    num_pos = pos_map.shape[1]
    cos2 = cos if cos.dim() == 3 else cos.expand(bsz, *cos.shape)
    sin2 = sin if sin.dim() == 3 else sin.expand(bsz, *sin.shape)
    cos2, sin2 = cos2.to(dtype), sin2.to(dtype)
    index = pos_map.long().clamp_min(0)
    k = k_rows.gather(2, index[:, None, :, None].expand(bsz, hkv, num_pos, d))
    v = v_rows.gather(2, index[:, None, :, None].expand(bsz, hkv, num_pos, d))
    half = d // 2
    rot = lambda x: torch.cat([-x[..., half:], x[..., :half]], -1)  # noqa: E731
    k = k * cos2[:, None, :num_pos] + rot(k) * sin2[:, None, :num_pos]
    cq = cos2.gather(1, q_positions.long()[..., None].expand(bsz, tq, d))[:, None]
    sq = sin2.gather(1, q_positions.long()[..., None].expand(bsz, tq, d))[:, None]
    qr = q * cq + rot(q) * sq
    j = torch.arange(num_pos)
    visible = (j[None, None] <= q_positions[..., None]) & (j[None, None] < full_lengths[:, None, None])
    o = F.scaled_dot_product_attention(qr, k, v, attn_mask=visible[:, None], enable_gqa=hq != hkv)
    return torch.where(visible.any(-1)[:, None, :, None], o, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_identity_map_equals_causal_rope_attention(backend, hq, hkv):
    """Every position its own row: ordinary causal RoPE attention over a standard cache."""
    bsz, p, d = 2, 12, 16
    q = torch.randn(bsz, hq, 1, d)
    k = torch.randn(bsz, hkv, p, d)
    v = torch.randn(bsz, hkv, p, d)
    cos, sin = rope_tables(p, d)
    pos_map = torch.arange(p, dtype=torch.int32).expand(bsz, p)
    q_positions = torch.full((bsz, 1), p - 1, dtype=torch.int32)
    half = d // 2
    rot = lambda x: torch.cat([-x[..., half:], x[..., :half]], -1)  # noqa: E731
    k_rot = k * cos + rot(k) * sin
    q_rot = q * cos[p - 1] + rot(q) * sin[p - 1]
    expected = F.scaled_dot_product_attention(q_rot, k_rot, v, enable_gqa=hq != hkv)
    device = device_for(backend)
    out = dk.vtu_decode_attention(*to(device, q, k, v, cos, sin, pos_map, q_positions), backend=backend)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vtu_attention_without_mean_is_the_special_case(backend):
    """Tq = P, q_positions = 0..P-1, q rows gathered through the map; the segment mean of the
    outputs equals vtu_attention."""
    bsz, hq, hkv, nu, nf, d = 2, 4, 2, 5, 14, 16
    q = torch.randn(bsz, hq, nu, d)
    k = torch.randn(bsz, hkv, nu, d)
    v = torch.randn(bsz, hkv, nu, d)
    cos, sin = rope_tables(nf, d)
    pos_map = onto_map(bsz, nf, nu)
    q_full = q.gather(2, pos_map.long()[:, None, :, None].expand(bsz, hq, nf, d))
    q_positions = torch.arange(nf, dtype=torch.int32).expand(bsz, nf)
    device = device_for(backend)
    out = dk.vtu_decode_attention(*to(device, q_full, k, v, cos, sin, pos_map, q_positions), backend=backend).cpu()
    index = pos_map.long()[:, None, :, None].expand(bsz, hq, nf, d)
    sums = torch.zeros(bsz, hq, nu, d).scatter_add_(2, index, out)
    counts = torch.zeros(bsz, nu).scatter_add_(1, pos_map.long(), torch.ones(bsz, nf))
    merged = sums / counts[:, None, :, None]
    torch.testing.assert_close(merged, vtu_oracle(q, k, v, cos, sin, pos_map).float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_that_see_no_key_are_zero(backend):
    bsz, hq, hkv, tq, r, p, d = 3, 2, 1, 2, 3, 8, 16
    q, k_rows, v_rows, cos, sin, pos_map, _ = make_case(bsz, hq, hkv, tq, r, p, d, torch.float32)
    q_positions = torch.tensor([[0, 5], [3, 3], [0, 7]], dtype=torch.int32)
    full_lengths = torch.tensor([p, 0, 1], dtype=torch.int32)
    device = device_for(backend)
    out = dk.vtu_decode_attention(
        *to(device, q, k_rows, v_rows, cos, sin, pos_map, q_positions), full_lengths=full_lengths.to(device), backend=backend
    ).cpu()
    assert torch.all(out[1] == 0)  # an empty cache
    # full_lengths 1: both queries see position 0 only -> its value row
    expected = v_rows[2, 0, int(pos_map[2, 0])]
    torch.testing.assert_close(out[2, :, 0], expected.expand(hq, d))
    torch.testing.assert_close(out[2, :, 1], expected.expand(hq, d))
    oracle = decode_oracle(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths)
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_positions_holding_nan_never_reach_outputs(backend):
    """NaN/inf in rows only hidden positions read, -1 map entries beyond full_lengths and NaN cos/sin
    rows beyond every used position leave the outputs exact; a NaN at a visible key propagates."""
    bsz, hq, hkv, tq, r, p, d = 2, 4, 2, 2, 6, 16, 16
    q, k_rows, v_rows, cos, sin, pos_map, _ = make_case(bsz, hq, hkv, tq, r, p, d, torch.float32, extra_rope=0)
    full_lengths = torch.tensor([11, 16], dtype=torch.int32)
    q_positions = torch.tensor([[4, 10], [6, 9]], dtype=torch.int32)
    # row 5 only at positions > every query position that can see it
    pos_map = pos_map.clone()
    pos_map[:, :11] = pos_map[:, :11] % 5
    pos_map[:, 11:] = 5
    pos_map[0, 11:] = -1  # beyond full_lengths[0]
    clean = decode_oracle(q, k_rows, v_rows, cos, sin, pos_map.clamp_min(0), q_positions, full_lengths)
    k_bad, v_bad = k_rows.clone(), v_rows.clone()
    k_bad[:, :, 5] = float("nan")
    v_bad[:, :, 5] = float("inf")
    cos_bad, sin_bad = cos.clone(), sin.clone()
    cos_bad[11:] = float("nan")
    sin_bad[11:] = float("inf")
    device = device_for(backend)
    out = dk.vtu_decode_attention(
        *to(device, q, k_bad, v_bad, cos_bad, sin_bad, pos_map, q_positions),
        full_lengths=full_lengths.to(device), backend=backend,
    ).cpu()
    torch.testing.assert_close(out.double(), clean, atol=1e-5, rtol=1e-5)
    # a visible NaN propagates (query 1 of image 0 at position 10 sees row pos_map[0, 3])
    k_vis = k_rows.clone()
    k_vis[0, 0, int(pos_map[0, 3])] = float("nan")
    out = dk.vtu_decode_attention(
        *to(device, q, k_vis, v_rows, cos, sin, pos_map, q_positions), full_lengths=full_lengths.to(device), backend=backend
    ).cpu()
    assert out[0, 0, 1].isnan().all() and out[0, 1, 1].isnan().all()
    assert not out[0, 2:].isnan().any() and not out[1].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_strided_inputs(backend):
    bsz, hq, hkv, tq, r, p, d = 2, 4, 2, 3, 9, 40, 32
    q, k_rows, v_rows, cos, sin, pos_map, q_positions = make_case(bsz, hq, hkv, tq, r, p, d, torch.float32)
    device = device_for(backend)
    args = to(device, q, k_rows, v_rows, cos, sin, pos_map, q_positions)
    first = dk.vtu_decode_attention(*args, backend=backend)
    second = dk.vtu_decode_attention(*args, backend=backend)
    assert torch.equal(first, second)
    # non-contiguous views: [B, Tq, Hq, D] storage transposed, rows in a wider buffer
    q_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    k_wide = torch.zeros(bsz, hkv, r, 2 * d, device=device)
    k_wide[..., :d] = args[1]
    strided = dk.vtu_decode_attention(q_t, k_wide[..., :d], *args[2:], backend=backend)
    torch.testing.assert_close(strided, first, atol=1e-6, rtol=1e-6)


def test_runs_on_meta_tensors():
    """The reference has no data-dependent shapes and reads no values (fake-tensor friendly)."""
    meta = torch.device("meta")
    q = torch.empty(2, 4, 1, 16, device=meta)
    k = torch.empty(2, 2, 5, 16, device=meta)
    cos = torch.empty(20, 16, device=meta)
    pos_map = torch.empty(2, 12, dtype=torch.int32, device=meta)
    q_positions = torch.empty(2, 1, dtype=torch.int32, device=meta)
    out = dk.vtu_decode_attention(q, k, k, cos, cos, pos_map, q_positions, backend="reference")
    assert out.shape == (2, 4, 1, 16) and out.device.type == "meta"


def test_bad_inputs_name_the_argument():
    q, k_rows, v_rows, cos, sin, pos_map, q_positions = make_case(2, 4, 2, 1, 5, 10, 16, torch.float32)
    call = dk.vtu_decode_attention
    with pytest.raises(ValueError, match="q must be"):
        call(q[0], k_rows, v_rows, cos, sin, pos_map, q_positions)
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k_rows.half(), v_rows, cos, sin, pos_map, q_positions)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        call(q[:, :3], k_rows, v_rows, cos, sin, pos_map, q_positions)
    with pytest.raises(ValueError, match="head dim D"):
        call(q[..., :15], k_rows[..., :15], v_rows[..., :15], cos[:, :15], sin[:, :15], pos_map, q_positions)
    with pytest.raises(ValueError, match="q_positions must be"):
        call(q, k_rows, v_rows, cos, sin, pos_map, q_positions[:1])
    with pytest.raises(ValueError, match="q_positions must lie"):
        call(q, k_rows, v_rows, cos, sin, pos_map, q_positions + 100)
    with pytest.raises(ValueError, match="cos has"):
        call(q, k_rows, v_rows, cos[:5], sin[:5], pos_map, q_positions)
    with pytest.raises(ValueError, match="pos_map must lie"):
        call(q, k_rows, v_rows, cos, sin, pos_map + 5, q_positions)
    with pytest.raises(ValueError, match="full_lengths must lie"):
        call(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths=torch.tensor([11, 3]))
    with pytest.raises(TypeError, match="pos_map must have dtype"):
        call(q, k_rows, v_rows, cos, sin, pos_map.float(), q_positions)
    with pytest.raises(ValueError, match="k_rows and v_rows"):
        call(q, k_rows, v_rows[:, :, :3], cos, sin, pos_map, q_positions)
    # map entries beyond full_lengths are ignored, even -1
    bad_tail = pos_map.clone()
    bad_tail[:, 8:] = -1
    call(q, k_rows, v_rows, cos, sin, bad_tail, q_positions, full_lengths=torch.tensor([8, 8]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_with_unequal_halves(backend):
    """cos/sin whose halves differ (not HF's layout) still follow the elementwise definition."""
    q, k_rows, v_rows, _, _, pos_map, q_positions = make_case(2, 4, 2, 2, 5, 12, 16, torch.float32)
    cos, sin = torch.randn(15, 16), torch.randn(15, 16)
    oracle = decode_oracle(q, k_rows, v_rows, cos, sin, pos_map, q_positions)
    device = device_for(backend)
    out = dk.vtu_decode_attention(*to(device, q, k_rows, v_rows, cos, sin, pos_map, q_positions), backend=backend)
    torch.testing.assert_close(out.cpu().double(), oracle, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensor_mode_gives_real_shapes(backend):
    """Under FakeTensorMode (which fails on any host read of device data) every backend returns
    the real op's shape and dtype: no host sync inside the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.randn(2, 4, 1, 16, dtype=torch.bfloat16)
        k = torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
        cos = torch.randn(20, 16)
        pos_map = torch.zeros(2, 12, dtype=torch.int32)
        q_positions = torch.zeros(2, 1, dtype=torch.int64)
        out = dk.vtu_decode_attention(q, k, k, cos, cos, pos_map, q_positions, full_lengths=torch.zeros(2, dtype=torch.int32), backend=backend)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
