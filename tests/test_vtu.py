"""VTU attention: every backend against the float64 oracle, and its properties."""

import pytest
import torch
import torch.nn.functional as F

import dymu_kernels as dk
from conftest import backend_params, device_for
from helpers import assert_within_2x_torch, onto_map, rope_tables
from oracle import vtu_oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(bsz, hq, hkv, nu, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, h, nu, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def text_image_text_map(prefix, groups, suffix):
    """Text positions map to themselves; image position i of group a maps to prefix + a."""
    image = torch.cat([torch.full((size,), a) for a, size in enumerate(groups)])
    nu = prefix + len(groups) + suffix
    return torch.cat([torch.arange(prefix), prefix + image, prefix + len(groups) + torch.arange(suffix)]), nu


CASES = [
    # (B, Hq, Hkv, Nu, Nf, D, causal)
    (1, 2, 2, 5, 9, 16, True),
    (2, 3, 1, 7, 20, 8, True),
    (2, 7, 1, 4, 11, 32, False),
    (1, 2, 2, 1, 1, 4, True),
]


@pytest.mark.parametrize("backend", backend_params("vtu_attention"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}Nu{c[3]}Nf{c[4]}D{c[5]}{'c' if c[6] else 'nc'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_rope", [True, False], ids=["cos2d", "cos3d"])
def test_vtu_matches_oracle(backend, case, dtype, shared_rope):
    bsz, hq, hkv, nu, nf, d, causal = case
    q, k, v = make_qkv(bsz, hq, hkv, nu, d, dtype)
    pos_map = onto_map(bsz, nf, nu, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(nf + 3, d, dtype=dtype)
    if not shared_rope:
        cos, sin = cos.expand(bsz, -1, -1).contiguous(), sin.expand(bsz, -1, -1).contiguous()
    full_lengths = torch.tensor([nf - (b % 2) * (nf // 3) for b in range(bsz)], dtype=torch.int32)
    pos_map = torch.where(torch.arange(nf) < full_lengths[:, None], pos_map, -1).to(torch.int32)
    oracle = vtu_oracle(q, k, v, cos, sin, pos_map, full_lengths, causal)
    same_dtype = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, causal=causal, backend="reference")
    dev = device_for(backend)
    out = dk.vtu_attention(
        q.to(dev), k.to(dev), v.to(dev), cos.to(dev), sin.to(dev), pos_map.to(dev),
        full_lengths=full_lengths.to(dev), causal=causal, backend=backend,
    )
    assert out.dtype == dtype and out.shape == q.shape
    # plain PyTorch in the same dtype: the oracle's inputs rounded to dtype, output rounded to dtype
    assert_within_2x_torch(out.cpu(), same_dtype if dtype == torch.float32 else oracle.to(dtype), oracle,
                           floor=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("backend", backend_params("vtu_attention"))
def test_vtu_text_image_text_groups_up_to_60(backend):
    pos, nu = text_image_text_map(3, [1, 5, 60, 2, 17], 4)
    pos_map = pos[None].to(torch.int32)
    q, k, v = make_qkv(1, 4, 2, nu, 16, torch.float32, seed=2)
    cos, sin = rope_tables(pos.numel(), 16)
    oracle = vtu_oracle(q, k, v, cos, sin, pos_map)
    dev = device_for(backend)
    out = dk.vtu_attention(q.to(dev), k.to(dev), v.to(dev), cos.to(dev), sin.to(dev), pos_map.to(dev), backend=backend)
    assert torch.allclose(out.cpu().double(), oracle, atol=2e-5)


@pytest.mark.parametrize("backend", backend_params("vtu_attention"))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (7, 1)])
def test_identity_map_equals_sdpa_with_rope(backend, hq, hkv):
    nf, d = 12, 16
    q, k, v = make_qkv(2, hq, hkv, nf, d, torch.float32, seed=4)
    cos, sin = rope_tables(nf, d)
    dev = device_for(backend)
    identity = torch.arange(nf, dtype=torch.int32).repeat(2, 1)
    out = dk.vtu_attention(q.to(dev), k.to(dev), v.to(dev), cos.to(dev), sin.to(dev), identity.to(dev), backend=backend)

    def rope(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    expected = F.scaled_dot_product_attention(
        rope(q), rope(k).repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), is_causal=True
    )
    assert torch.allclose(out.cpu(), expected, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("vtu_attention"))
def test_unmapped_rows_are_zero_and_deterministic(backend):
    q, k, v = make_qkv(2, 2, 2, 6, 8, torch.float32)
    cos, sin = rope_tables(10, 8)
    pos_map = torch.tensor([[0, 0, 1, 2, 2, 3, 3, 3, 4, 5], [0, 1, 1, 1, 2, 2, -1, -1, -1, -1]], dtype=torch.int32)
    full_lengths = torch.tensor([10, 6], dtype=torch.int32)
    dev = device_for(backend)
    args = [t.to(dev) for t in (q, k, v, cos, sin, pos_map)]
    out = dk.vtu_attention(*args, full_lengths=full_lengths.to(dev), backend=backend)
    assert (out[1, :, 3:] == 0).all()
    assert not out.isnan().any()
    again = dk.vtu_attention(*args, full_lengths=full_lengths.to(dev), backend=backend)
    assert torch.equal(out, again)
    nothing = dk.vtu_attention(*args, full_lengths=torch.zeros(2, dtype=torch.int32, device=dev), backend=backend)
    assert (nothing == 0).all()
