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
    """The tile sizes launched on a GPU (BLOCK_M=64, BLOCK_N=64), on non-contiguous q/k/v."""
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
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (64, 64)
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


def _reference(q, k, v, cos, sin, pos_map, full_lengths, causal=True):
    from dymu_kernels.vtu import reference

    bsz = q.shape[0]
    if cos.dim() == 2:
        cos, sin = cos.expand(bsz, *cos.shape), sin.expand(bsz, *sin.shape)
    return reference.vtu_attention(q, k, v, cos, sin, pos_map, full_lengths, causal, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("poison", ["v_nan", "v_inf", "k_nan"])
def test_hidden_non_finite_kv_never_leaks(poison):
    """Masking rule: K/V at positions hidden from a query (causal, or beyond the length)
    never affect it, even when NaN/inf; a non-finite V at a visible key propagates."""
    nu, nf, d = 7, 40, 16
    q, k, v = make_inputs(2, 4, 2, nu, d, torch.float32, seed=11)
    full_lengths = torch.tensor([40, 30], dtype=torch.int32)
    # Row 6 is used only by the last position of image 0 (causally hidden from every other
    # query) and by nothing valid in image 1 (only beyond its length).
    g = torch.Generator().manual_seed(12)
    pos_map = torch.randint(0, 6, (2, nf), generator=g, dtype=torch.int32)
    pos_map[:, :6] = torch.arange(6, dtype=torch.int32)
    pos_map[0, 39] = 6
    pos_map[1, 30:] = 6
    cos, sin = rope_tables(nf, d)
    bad = {"v_nan": float("nan"), "v_inf": float("inf"), "k_nan": float("nan")}[poison]
    k_bad, v_bad = k.clone(), v.clone()
    (k_bad if poison == "k_nan" else v_bad)[:, :, 6, 3] = bad
    out = run(q, k_bad, v_bad, cos, sin, pos_map, full_lengths)
    clean = run(q, k, v, cos, sin, pos_map, full_lengths)
    assert torch.isfinite(out[:, :, :6]).all()
    assert torch.allclose(out[:, :, :6], clean[:, :, :6], atol=1e-6)
    assert (out[1, :, 6] == 0).all()  # row 6 has no valid position in image 1
    if poison.startswith("v"):
        assert out[0, :, 6].isnan().all()  # its own query sees the non-finite V
    else:
        assert not torch.isfinite(out[0, :, 6]).all()
    # Non-causal: every valid query of image 0 sees position 39, image 1 still never does.
    out_nc = run(q, k_bad, v_bad, cos, sin, pos_map, full_lengths, causal=False)
    assert not torch.isfinite(out_nc[0]).all(dim=-1).any()
    assert torch.allclose(out_nc[1], run(q, k, v, cos, sin, pos_map, full_lengths, causal=False)[1], atol=1e-6)


def test_out_of_range_map_entries_clamp_like_reference():
    """With validation off a valid position's map entry outside [0, Nu) is clamped into
    [0, Nu - 1] (as the reference does), in whichever tile it falls."""
    from dymu_kernels.vtu import triton as vt

    nu, nf, d = 6, 45, 16
    q, k, v = make_inputs(1, 2, 1, nu, d, torch.float32, seed=13)
    full_lengths = torch.tensor([43], dtype=torch.int32)
    pos_map = scattered_map(1, nf, nu, full_lengths, seed=14)
    pos_map[0, [0, 5, 17, 33, 42]] = torch.tensor([-3, 9, -1, 6, 100], dtype=torch.int32)
    cos, sin = rope_tables(nf, d)
    cos3, sin3 = cos.expand(1, -1, -1), sin.expand(1, -1, -1)
    for causal in (True, False):
        out = vt.vtu_attention(q.to(DEV), k.to(DEV), v.to(DEV), cos3.to(DEV), sin3.to(DEV), pos_map.to(DEV),
                               full_lengths.to(DEV), causal, d**-0.5).cpu()
        ref = _reference(q, k, v, cos, sin, pos_map, full_lengths, causal)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # Through the public op with validation off, on the device (CPU tensors are always checked).
    if DEV.type == "cuda":
        out = dk.vtu_attention(q.to(DEV), k.to(DEV), v.to(DEV), cos.to(DEV), sin.to(DEV), pos_map.to(DEV),
                               full_lengths=full_lengths.to(DEV), backend="triton", validate=False).cpu()
        assert torch.allclose(out, _reference(q, k, v, cos, sin, pos_map, full_lengths), atol=1e-5)


def test_every_launch_is_guarded_by_the_tensors_device(monkeypatch):
    """Launches run under the tensors' device (Triton uses that device's current stream)."""
    import contextlib

    from dymu_kernels.vtu import triton as vt

    entered = []
    real = vt._device_guard

    @contextlib.contextmanager
    def recording(t):
        entered.append(t.device)
        with real(t):
            yield

    monkeypatch.setattr(vt, "_device_guard", recording)
    launches = []
    kernel_type = type(vt.vtu_attention_fwd_kernel)  # all three kernels share it
    orig = kernel_type.__getitem__
    monkeypatch.setattr(kernel_type, "__getitem__", lambda self, grid: launches.append(len(entered)) or orig(self, grid))
    q, k, v = make_inputs(1, 2, 1, 3, 16, torch.float32)
    cos, sin = rope_tables(6, 16)
    run(q, k, v, cos, sin, torch.tensor([[0, 1, 1, 2, 0, 2]], dtype=torch.int32))
    assert len(entered) == 1 and entered[0].type == DEV.type
    assert launches == [1, 1, 1]  # all three kernels launched inside the guard
    # On a CUDA tensor the guard is torch.cuda.device(t.device) (checked without a GPU).
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: made.append(dev) or contextlib.nullcontext())
    fake = type("T", (), {"is_cuda": True, "device": torch.device("cuda", 1)})()
    with real(fake):
        pass
    assert made == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    q, k, v = make_inputs(1, 4, 2, 9, 64, torch.bfloat16, seed=15)
    full_lengths = torch.tensor([37], dtype=torch.int32)
    pos_map = scattered_map(1, 40, 9, full_lengths, seed=16)
    cos, sin = rope_tables(40, 64)
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        out = dk.vtu_attention(*(t.to(dev) for t in (q, k, v, cos, sin, pos_map)),
                               full_lengths=full_lengths.to(dev), backend="triton")
        torch.cuda.synchronize(dev)
    assert out.device == dev
    check(out.cpu(), q, k, v, cos, sin, pos_map, full_lengths)


def test_compile_specs_match_kernels_and_cover_the_runtime_dtypes():
    """COMPILE_SPECS compile what runs: signatures match the kernels, every q dtype with
    cos/sin in fp32 and in q's dtype, the launcher's tiles, only real args specialised."""
    from dymu_kernels.vtu import triton as vt

    combos = set()
    for spec in vt.COMPILE_SPECS:
        sig = spec["signature"]
        assert list(sig) == list(spec["kernel"].arg_names), spec["name"]
        assert {k for k, v in sig.items() if v == "constexpr"} == set(spec["constexprs"]), spec["name"]
        special = spec.get("specialize", {})
        for name in special.get("divisible_by_16", []) + special.get("equal_to_1", []):
            assert name in sig and sig[name] != "constexpr", (spec["name"], name)
        if spec["kernel"] is vt.vtu_attention_fwd_kernel:
            combos.add((sig["Q"], sig["COS"]))
            dim = spec["constexprs"]["HEAD_DIM"]
            dtype = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32}[sig["Q"]]
            cfg = vt.attention_config(dim, dtype, capability=(spec["archs"][0] // 10, spec["archs"][0] % 10))
            assert all(spec["constexprs"][k] == cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_HALF", "BLOCK_D"))
            assert (spec["num_warps"], spec["num_stages"]) == (cfg["num_warps"], cfg["num_stages"])
    assert combos == {("*fp16", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*fp32"), ("*bf16", "*bf16"), ("*fp32", "*fp32")}
    # Sizes never specialise (no recompile per length); strides do (divisibility hints).
    import inspect
    import re

    from dymu_kernels.vtu import triton_kernels

    source = inspect.getsource(triton_kernels)
    for kernel in ("vtu_attention_fwd_kernel", "vtu_group_rows_kernel", "vtu_zero_empty_rows_kernel"):
        dns = re.search(r"do_not_specialize=\[([^\]]*)\]\s*\)\s*def " + kernel, source).group(1)
        names = set(re.findall(r'"(\w+)"', dns))
        assert "num_merged" in names and not any(name.startswith("stride") for name in names), (kernel, names)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("nu", [3, 40], ids=["carry-by-row", "carry-by-tile"])
def test_whole_rows_spanning_many_steps(causal, hq, hkv, nu):
    """A merged row far longer than a step (BLOCK_S slots) is walked by the one program that
    owns it, its partial sum carried from step to step; the programs whose tiles it covers
    own nothing. nu=3 < num_tiles indexes the carry by row, nu=40 by tile."""
    nf = 130
    rows = torch.cat([torch.full((70,), 1), torch.arange(nu), torch.randint(0, nu, (nf - 70 - nu,),
                                                                          generator=torch.Generator().manual_seed(11))])
    pos_map = rows[torch.randperm(nf, generator=torch.Generator().manual_seed(12))][None].to(torch.int32)
    q, k, v = make_inputs(1, hq, hkv, nu, 16, torch.float32, seed=13)
    cos, sin = rope_tables(nf, 16)
    out = run(q, k, v, cos, sin, pos_map, causal=causal)
    check(out, q, k, v, cos, sin, pos_map, causal=causal)
    assert torch.equal(out, run(q, k, v, cos, sin, pos_map, causal=causal))  # bit-identical


def test_one_row_image_and_identity_map():
    """Every position in one merged row (one program walks the whole image), and the identity
    map (every row one slot: no carry at all) equals plain causal attention."""
    nf, d = 50, 16
    q, k, v = make_inputs(1, 2, 2, 1, d, torch.float32, seed=14)
    cos, sin = rope_tables(nf, d)
    one_row = torch.zeros(1, nf, dtype=torch.int32)
    check(run(q, k, v, cos, sin, one_row), q, k, v, cos, sin, one_row)
    q, k, v = make_inputs(1, 2, 2, nf, d, torch.float32, seed=15)
    identity = torch.arange(nf, dtype=torch.int32)[None]
    out = run(q, k, v, cos, sin, identity)
    from dymu_kernels.vtu.reference import apply_rope

    qr, kr = apply_rope(q, cos[None, :nf], sin[None, :nf]), apply_rope(k, cos[None, :nf], sin[None, :nf])
    plain = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)


def test_carry_is_min_of_rows_and_tiles(monkeypatch):
    """The only fp32 scratch is the carry, [B, Hq, min(Nu, num_tiles), D]: never Nf x D."""
    from dymu_kernels.vtu import triton as vt

    made = []
    real_empty = vt.empty
    monkeypatch.setattr(vt, "empty", lambda shape, dtype, device: made.append((tuple(shape), dtype))
                        or real_empty(shape, dtype, device))
    nf, d = 96, 16
    cfg = vt.attention_config(d, torch.float32, interpreter=True)
    num_tiles = -(-nf // cfg["BLOCK_M"])
    for nu in (2, 40):
        made.clear()
        q, k, v = make_inputs(1, 2, 2, nu, d, torch.float32, seed=16)
        cos, sin = rope_tables(nf, d)
        pos_map = scattered_map(1, nf, nu, torch.tensor([nf]), seed=17)
        check(run(q, k, v, cos, sin, pos_map), q, k, v, cos, sin, pos_map)
        fp32 = [shape for shape, dtype in made if dtype == torch.float32]
        fp32.remove((1, 2, nu, d))  # the output
        assert fp32 == [(1, 2, min(nu, num_tiles), d)], fp32
