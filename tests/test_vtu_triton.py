"""Triton VTU attention: cases specific to the fused kernel (padded D, big groups, GQA 7:1,
-1 map entries, stride-0 cos/sin, the GPU block sizes, determinism, torch.library op).

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it without a GPU), so
shapes stay tiny.
"""

import pytest
import torch

import dymu_kernels as dk
from conftest import device_for
from dymu_kernels._backends import implements
from helpers import assert_within_2x_torch, rope_tables
from oracle import vtu_oracle

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not implements("triton", "vtu_attention"), reason="triton backend unavailable"),
]

DEV = device_for("triton")


def make_inputs(bsz, hq, hkv, nu, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, h, nu, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def scattered_map(bsz, nf, nu, full_lengths, seed=1):
    """Onto maps whose groups are scattered over the sequence (as DToMe's are), -1 beyond length."""
    g = torch.Generator().manual_seed(seed)
    maps = []
    for b in range(bsz):
        t = int(full_lengths[b])
        rows = torch.cat([torch.arange(min(nu, t)), torch.randint(0, nu, (max(t - nu, 0),), generator=g)])
        rows = rows[torch.randperm(t, generator=g)]
        maps.append(torch.cat([rows, torch.full((nf - t,), -1)]))
    return torch.stack(maps).to(torch.int32)


def run(q, k, v, cos, sin, pos_map, full_lengths=None, causal=True, **kw):
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return dk.vtu_attention(to(q), to(k), to(v), to(cos), to(sin), to(pos_map),
                            full_lengths=to(full_lengths), causal=causal, backend="triton", **kw).cpu()


def check(out, q, k, v, cos, sin, pos_map, full_lengths=None, causal=True):
    oracle = vtu_oracle(q, k, v, cos, sin, pos_map, full_lengths, causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    if q.dtype == torch.float32:
        same = dk.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths=full_lengths, causal=causal, backend="reference")
        assert_within_2x_torch(out, same, oracle, floor=1e-5)
    else:
        assert_within_2x_torch(out, oracle.to(q.dtype), oracle, floor=2e-3)


@pytest.mark.parametrize("d", [72, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_head_dims(d, dtype):
    q, k, v = make_inputs(1, 2, 1, 6, d, dtype)
    full_lengths = torch.tensor([19], dtype=torch.int32)
    pos_map = scattered_map(1, 21, 6, full_lengths)
    cos, sin = rope_tables(24, d, dtype=dtype)
    out = run(q, k, v, cos, sin, pos_map, full_lengths)
    check(out, q, k, v, cos, sin, pos_map, full_lengths)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_7_to_1_with_minus_one_entries_and_cos3d(causal):
    bsz, nf, nu = 3, 37, 9
    q, k, v = make_inputs(bsz, 7, 1, nu, 16, torch.float16, seed=3)
    full_lengths = torch.tensor([37, 20, 9], dtype=torch.int32)
    pos_map = scattered_map(bsz, nf, nu, full_lengths, seed=4)
    cos, sin = rope_tables(nf, 16, dtype=torch.float16)
    cos, sin = cos.expand(bsz, -1, -1).contiguous(), sin.expand(bsz, -1, -1).contiguous()
    pad = torch.arange(nf) >= full_lengths[:, None]
    cos[pad], sin[pad] = float("nan"), float("nan")  # nothing beyond the length may be read
    out = run(q, k, v, cos, sin, pos_map, full_lengths, causal=causal)
    check(out, q, k, v, cos, sin, pos_map, full_lengths, causal=causal)


def test_group_of_60_scattered_bf16():
    nu, nf = 5, 75
    pos_map = torch.cat([torch.full((60,), 2), torch.tensor([0, 1, 1, 3, 4, 4, 4, 0, 1, 3, 3, 4, 0, 1, 3])])
    pos_map = pos_map[torch.randperm(nf, generator=torch.Generator().manual_seed(5))][None].to(torch.int32)
    q, k, v = make_inputs(1, 2, 2, nu, 32, torch.bfloat16, seed=6)
    cos, sin = rope_tables(nf, 32, dtype=torch.bfloat16)
    out = run(q, k, v, cos, sin, pos_map)
    check(out, q, k, v, cos, sin, pos_map)


def test_gpu_block_sizes_and_strided_inputs():
    """The tile sizes launched on a GPU (BLOCK_M=128, BLOCK_N=64), on non-contiguous q/k/v."""
    from dymu_kernels.vtu import triton as vt

    nu, nf, d = 40, 150, 64
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, nu, 4, d, generator=g).transpose(1, 2)  # [B, Hq, Nu, D] with odd strides
    kv = torch.randn(1, nu, 2, 2 * d, generator=g).transpose(1, 2)
    k, v = kv[..., :d], kv[..., d:]
    full_lengths = torch.tensor([141], dtype=torch.int32)
    pos_map = scattered_map(1, nf, nu, full_lengths, seed=8)
    cos, sin = rope_tables(nf, d)
    cos, sin = cos.expand(1, -1, -1), sin.expand(1, -1, -1)
    cfg = vt.attention_config(d, torch.float16)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (128, 64)
    out = vt._launch(q, k, v, cos, sin, pos_map, full_lengths, True, d**-0.5,
                     config=dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]))
    check(out, q, k, v, cos, sin, pos_map, full_lengths)


def test_deterministic_and_unmapped_rows_zero():
    q, k, v = make_inputs(2, 4, 2, 8, 8, torch.float32, seed=9)
    full_lengths = torch.tensor([13, 0], dtype=torch.int32)
    pos_map = torch.full((2, 16), -1, dtype=torch.int32)
    pos_map[0, :13] = torch.tensor([0, 2, 2, 4, 0, 4, 4, 6, 2, 0, 6, 6, 4])  # rows 1, 3, 5, 7 unmapped
    cos, sin = rope_tables(16, 8)
    out = run(q, k, v, cos, sin, pos_map, full_lengths)
    assert (out[0, :, 1::2] == 0).all() and (out[1] == 0).all()
    assert torch.equal(out, run(q, k, v, cos, sin, pos_map, full_lengths))
    check(out, q, k, v, cos, sin, pos_map, full_lengths)


def test_registered_op_and_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.dymu.triton_vtu_attention
    with FakeTensorMode():
        q = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16)
        kv = torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
        cos = torch.randn(9, 16).expand(2, 9, 16)
        out = op(q, kv, kv, cos, cos, torch.zeros(2, 9, dtype=torch.int32), torch.full((2,), 9, dtype=torch.int32), True, 0.25)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.library.opcheck(
        op,
        (torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16),
         torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.tensor([[0, 1, 1, 2, 0, 2]], dtype=torch.int32),
         torch.tensor([6], dtype=torch.int32), True, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )
