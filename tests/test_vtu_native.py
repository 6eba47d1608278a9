"""Native (C++/OpenMP) VTU attention: realistic shapes, dtypes, strides, padding, determinism.

The generic parity tests live in test_vtu.py; these cover what is specific to the CPU kernel
(its blocking over 64-row query/key blocks, head-dim padding to 16, strided inputs, the stride-0
broadcast cos/sin view, thread-count independence).
"""

import pytest
import torch

import dymu_kernels as dk
from dymu_kernels._backends import implements
from helpers import assert_within_2x_torch, onto_map, rope_tables
from oracle import vtu_oracle

pytestmark = pytest.mark.skipif(not implements("native", "vtu_attention"), reason="native vtu_attention not built")


def inputs(bsz, hq, hkv, nu, nf, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, h, nu, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    pos_map = onto_map(bsz, nf, nu, generator=g)
    cos, sin = rope_tables(nf + 5, d, dtype=dtype)
    return q, k, v, cos, sin, pos_map


def check_against_oracle(q, k, v, cos, sin, pos_map, full_lengths=None, causal=True):
    oracle = vtu_oracle(q, k, v, cos, sin, pos_map, full_lengths, causal)
    out = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, causal=causal, backend="native")
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    if q.dtype == torch.float32:
        same = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, causal=causal, backend="reference")
        assert_within_2x_torch(out, same, oracle, floor=1e-5)
    else:
        assert_within_2x_torch(out, oracle.to(q.dtype), oracle, floor=2e-3)
    return out


@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_realistic_shape_fp32(d, causal):
    """SmolLM-like GQA (9 query heads on 3 kv heads), several 64-row blocks, a ragged last block."""
    check_against_oracle(*inputs(1, 9, 3, 70, 300, d, torch.float32), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_realistic_shape_half(dtype):
    q, k, v, cos, sin, pos_map = inputs(2, 9, 3, 70, 300, 64, dtype, seed=1)
    full_lengths = torch.tensor([300, 211], dtype=torch.int32)
    pos_map = torch.where(torch.arange(300) < full_lengths[:, None], pos_map, -1).to(torch.int32)
    check_against_oracle(q, k, v, cos, sin, pos_map, full_lengths)


def test_strided_inputs_and_broadcast_rope():
    """Transposed-view q/k/v ([B, N, H, D] storage), a 3-d cos/sin with a zero batch stride."""
    bsz, hq, hkv, nu, nf, d = 2, 4, 2, 33, 130, 48
    q, k, v, cos, sin, pos_map = inputs(bsz, hq, hkv, nu, nf, d, torch.float32, seed=2)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    cos3, sin3 = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    assert cos3.stride(0) == 0
    pm = torch.stack([pos_map, pos_map + 0], dim=-1)[..., 0]  # a non-contiguous int32 map view
    assert not pm.is_contiguous()
    out = check_against_oracle(qt, kt, vt, cos3, sin3, pm)
    contiguous = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
    assert torch.equal(out, contiguous)


def test_short_full_lengths_with_garbage_map():
    """Positions past full_lengths hold -1 in the map and NaN in cos/sin: nothing may leak."""
    bsz, hq, hkv, nu, nf, d = 3, 6, 2, 20, 150, 32
    q, k, v, cos, sin, _ = inputs(bsz, hq, hkv, nu, nf, d, torch.float32, seed=3)
    full_lengths = torch.tensor([150, 64, 0], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    pos_map = torch.zeros(bsz, nf, dtype=torch.int32)
    pos_map[0] = onto_map(1, nf, nu, generator=g)[0]
    pos_map[1, :64] = onto_map(1, 64, nu, generator=g)[0]
    pos_map = torch.where(torch.arange(nf) < full_lengths[:, None], pos_map, -1).to(torch.int32)
    cos3, sin3 = cos.expand(bsz, -1, -1).clone(), sin.expand(bsz, -1, -1).clone()
    cos3[1, 64:] = float("nan")
    sin3[1, 64:] = float("nan")
    out = check_against_oracle(q, k, v, cos3, sin3, pos_map, full_lengths)
    assert not out.isnan().any()
    assert (out[2] == 0).all()  # empty sequence: every merged row is unmapped


def test_unmapped_rows_written_as_zero():
    q, k, v, cos, sin, _ = inputs(1, 2, 1, 10, 10, 16, torch.bfloat16)
    pos_map = torch.tensor([[0, 0, 2, 2, 2, 5, 9]], dtype=torch.int32)
    out = check_against_oracle(q, k, v, cos, sin, pos_map)
    unmapped = [1, 3, 4, 6, 7, 8]
    assert (out[:, :, unmapped] == 0).all()
    assert (out[:, :, [0, 2, 5, 9]] != 0).any(dim=-1).all()


def test_bit_identical_repeats_and_thread_counts():
    q, k, v, cos, sin, pos_map = inputs(2, 9, 3, 70, 300, 64, torch.float32, seed=5)
    first = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
    for _ in range(3):
        assert torch.equal(first, dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


def test_under_fake_tensor_mode_and_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v, cos, sin, pos_map = inputs(2, 4, 2, 5, 9, 8, torch.bfloat16)
        out = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
        assert out.shape == q.shape and out.dtype == torch.bfloat16
    meta = [t.to("meta") for t in inputs(2, 4, 2, 5, 9, 8, torch.float16)]
    out = dk.vtu_attention(*meta, backend="native")
    assert out.shape == meta[0].shape and out.device.type == "meta"


def test_batch_groups_equal_single_images():
    """Large images (12.6 MB of scratch each) are processed in groups of 5 under the 64 MiB
    budget: a batch of 6 must equal each image run alone, bit for bit."""
    bsz, h, nu, nf, d = 6, 8, 300, 1024, 128
    q, k, v, cos, sin, pos_map = inputs(bsz, h, h, nu, nf, d, torch.bfloat16, seed=6)
    full_lengths = torch.tensor([1024, 1000, 513, 64, 1, 777], dtype=torch.int32)
    pos_map = torch.where(torch.arange(nf) < full_lengths[:, None], pos_map, -1).to(torch.int32)
    batched = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, backend="native")
    for b in range(bsz):
        one = dk.vtu_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], cos, sin, pos_map[b:b + 1],
                               full_lengths=full_lengths[b:b + 1], backend="native")
        assert torch.equal(batched[b:b + 1], one), b
    reference = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, backend="reference")
    assert (batched.float() - reference.float()).abs().max() < 2e-2


def scattered_map(bsz, nf, nu, generator, long_rows=()):
    """[bsz, nf] int32 onto maps whose rows are scattered over the sequence (as DToMe's are),
    with the rows in ``long_rows`` covering many positions (more than one 64-position chunk)."""
    maps = []
    for _ in range(bsz):
        weights = torch.ones(nu)
        for a in long_rows:
            weights[a] = 40.0
        extra = torch.multinomial(weights, nf - nu, replacement=True, generator=generator)
        rows = torch.cat([torch.arange(nu), extra])
        maps.append(rows[torch.randperm(nf, generator=generator)])
    return torch.stack(maps).to(torch.int32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scattered_rows_and_rows_longer_than_a_chunk(causal, dtype):
    """Rows whose positions are spread over the sequence and rows of 100+ positions (one work
    unit processed in several chunks); GQA 8 on 2; ragged full_lengths."""
    bsz, hq, hkv, nu, nf, d = 2, 8, 2, 24, 400, 64
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(bsz, h, nu, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    cos, sin = rope_tables(nf, d, dtype=dtype)
    pos_map = scattered_map(bsz, nf, nu, g, long_rows=(3, 17))
    assert (pos_map[0] == 3).sum() > 64
    full_lengths = torch.tensor([400, 333], dtype=torch.int32)
    pos_map = torch.where(torch.arange(nf) < full_lengths[:, None], pos_map, -1).to(torch.int32)
    check_against_oracle(q, k, v, cos, sin, pos_map, full_lengths, causal=causal)


def lone_row_map(nf, nu, lone_row, lone_pos, generator):
    """[1, nf] onto map in which merged row ``lone_row`` is covered by position ``lone_pos`` only."""
    others = torch.tensor([a for a in range(nu) if a != lone_row])
    rows = others[torch.randint(0, nu - 1, (nf,), generator=generator)]
    rows[: nu - 1] = others  # every other row covered
    rows = rows[torch.randperm(nf, generator=generator)]
    rows[lone_pos] = lone_row
    if lone_pos < nu - 1:
        raise ValueError("keep lone_pos past the covering prefix")
    return rows[None].to(torch.int32)


@pytest.mark.parametrize("where", ["k", "v", "both"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_hidden_nonfinite_keys_do_not_leak(where, value):
    """A merged row seen only at the last position holds NaN/inf in K and/or V: causally hidden
    from every other query, it may change nothing but its own row (0 * NaN must not leak)."""
    nf, nu, d, lone = 150, 20, 32, 7
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, nu, d, generator=g) for h in (4, 2, 2))
    cos, sin = rope_tables(nf, d)
    pos_map = lone_row_map(nf, nu, lone, nf - 1, g)
    clean = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
    bad_k, bad_v = k.clone(), v.clone()
    if where in ("k", "both"):
        bad_k[:, :, lone, 3] = value
    if where in ("v", "both"):
        bad_v[:, :, lone, 5] = value
    out = dk.vtu_attention(q, bad_k, bad_v, cos, sin, pos_map, backend="native")
    others = [a for a in range(nu) if a != lone]
    assert torch.equal(out[:, :, others], clean[:, :, others])
    assert not out[:, :, lone].isfinite().all()  # visible to its own query: propagates


def test_keys_past_full_lengths_do_not_leak():
    """NaN in K/V of a row that only padded positions (>= full_lengths) point to, and NaN in
    cos/sin there: nothing changes, non-causal attention included."""
    nf, nu, d = 130, 12, 16
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, h, nu, d, generator=g) for h in (2, 1, 1))
    cos, sin = rope_tables(nf, d)
    full_lengths = torch.tensor([100], dtype=torch.int32)
    pos_map = torch.cat([onto_map(1, 100, nu - 1, generator=g), torch.full((1, 30), nu - 1, dtype=torch.int32)], 1)
    for causal in (True, False):
        clean = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, causal=causal, backend="native")
        bad_k, bad_v, bad_cos = k.clone(), v.clone(), cos.clone()
        bad_k[:, :, nu - 1] = float("nan")
        bad_v[:, :, nu - 1] = float("inf")
        bad_cos[100:] = float("nan")
        out = dk.vtu_attention(q, bad_k, bad_v, bad_cos, sin, pos_map, full_lengths=full_lengths, causal=causal,
                               backend="native")
        assert torch.equal(out, clean)
        assert (out[:, :, nu - 1] == 0).all()


def test_visible_nonfinite_values_propagate():
    """NaN in V of the row at position 0 (visible to every causal query) reaches every row."""
    q, k, v, cos, sin, pos_map = inputs(1, 2, 1, 10, 40, 16, torch.float32, seed=14)
    v = v.clone()
    v[:, :, int(pos_map[0, 0]), 0] = float("nan")
    out = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="native")
    assert out[..., 0].isnan().all()


def test_out_of_range_map_entries_are_clamped():
    """With validation off (GPU tensors) a map entry outside [0, Nu) at a valid position can reach
    the kernel: it is clamped into [0, Nu - 1], as the reference does."""
    from dymu_kernels.vtu import native, reference

    q, k, v, cos, sin, pos_map = inputs(2, 4, 2, 9, 140, 32, torch.float32, seed=15)
    pos_map = pos_map.clone()
    pos_map[0, 5], pos_map[0, 77], pos_map[1, 100] = -3, 9, 1000
    full_lengths = torch.tensor([140, 120], dtype=torch.int32)
    pos_map[1, 120:] = -1
    cos3, sin3 = cos.expand(2, -1, -1), sin.expand(2, -1, -1)
    args = (q, k, v, cos3, sin3, pos_map, full_lengths, True, 32**-0.5)
    out = native.vtu_attention(*args)
    expected = reference.vtu_attention(*args)
    assert torch.allclose(out, expected, atol=1e-5)
