"""Triton backend of VTU attention: launcher, torch.library op and compile specs.

``vtu_attention`` takes the normalised arguments of ``dymu_kernels.vtu.reference.vtu_attention``
and runs three kernels (``triton_kernels.py``): a stable counting sort of the valid positions
by merged row, the fused gather + RoPE + flash-attention forward over those positions in
merged-row order, tiled on whole merged rows with each row's mean formed in its epilogue, and
a small pass that zeroes unmapped rows. No host sync (lengths stay on the device, all sizes
are static), no per-length recompilation (only the integer sizes are do_not_specialize;
pointers and strides keep Triton's divisibility / unit-stride specialisation, which gives
vectorised loads and cp.async), no autotuning (block sizes are picked here from D, the dtype
and the GPU).

Memory beyond the output: int32 [B, Nf] (positions grouped by row) and 2 x [B, Nu], plus the
fp32 carry of rows still open at the end of a step, [B, Hq, min(Nu, num_tiles), D] with
num_tiles = cdiv(Nf, BLOCK_S): O(B * Hq * Nu * D), at most the output's size in fp32. Q, K, V
and the attention output are never expanded to full length.

Every launch runs under ``torch.cuda.device(q.device)`` (``_device_guard``), so tensors on a
GPU other than the current one use their own device and its current stream.

Limitations: inference only; D even and <= 128; fp32 inputs use IEEE fp32 dots (no TF32);
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests; dots then run in fp32
because the interpreter has no bf16 dot; the GPU's bf16 roundings are emulated in
tests/test_vtu_bf16_emulation.py). The compile check (``python -m dymu_kernels.compile_check``)
must show no spills: the tiles of ``attention_config`` are the largest found spill-free
(sm_80, sm_90 for D > 64 and D not a multiple of 16 get BLOCK_M = 32).
"""

import contextlib
import functools
import math
import os

import torch
import triton

from .._alloc import empty
from .triton_kernels import vtu_attention_fwd_kernel, vtu_group_rows_kernel, vtu_zero_empty_rows_kernel

SUPPORTED = frozenset({"vtu_attention"})

LOG2_E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def attention_config(head_dim: int, dtype: torch.dtype, interpreter: bool = False, capability=(9, 0)) -> dict:
    """Block sizes and launch options of the attention kernel for this D, dtype and GPU.

    BLOCK_HALF pads D/2 (each RoPE half), BLOCK_D pads D (the V/output columns); both are
    powers of two >= 16 (tl.dot needs K, N >= 16). fp16/bf16 dot in the input dtype with
    fp32 accumulation; fp32 dots are IEEE (CUDA cores). Every key tile is gathered and
    rotated in registers and the epilogue's segmented scan holds two [BLOCK_M, BLOCK_D]
    tiles (and the whole-row step loop keeps the row bookkeeping live), which is what bounds
    BLOCK_M and BLOCK_N: the choices below are the largest that
    compile without spills (``python -m dymu_kernels.compile_check``) on sm_90
    (capability >= 9) and sm_80, for cos/sin in fp32 and in q's dtype.
    """
    cfg = dict(BLOCK_HALF=_pow2_at_least_16(head_dim // 2), BLOCK_D=_pow2_at_least_16(head_dim))
    wide = cfg["BLOCK_D"] > 64
    if interpreter:
        # Small tiles so tiny test shapes still cross tile borders and the diagonal split.
        cfg.update(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    elif dtype == torch.float32 and head_dim % 16 != 0:
        cfg.update(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1)
    elif dtype == torch.float32:
        cfg.update(BLOCK_M=32 if wide else 64, BLOCK_N=16, num_warps=8, num_stages=2)
    elif head_dim % 16 != 0:  # D = 72, ...: no 16-element alignment, the padded halves cost most
        cfg.update(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    elif tuple(capability) >= (9, 0) and not wide:
        cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    else:  # sm_80, and sm_90 for D > 64 (the whole-row step loop): BLOCK_M = 64 spills 16-48 B
        cfg.update(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    return cfg


@functools.lru_cache(maxsize=None)
def _capability(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def grouping_config(interpreter: bool = False) -> dict:
    """Tile sizes of the counting-sort and re-merge kernels."""
    if interpreter:
        return dict(BLOCK_R=16, BLOCK_P=16)
    return dict(BLOCK_R=32, BLOCK_P=128)


def group_heads(num_kv_groups: int, block_m: int) -> int:
    """Query heads packed into one program: the GQA group (padded to a power of two), at most
    BLOCK_M // 16 so a tile keeps >= 16 query slots (larger groups take several programs)."""
    return min(triton.next_power_of_2(num_kv_groups), max(block_m // 16, 1))


def _device_guard(t: torch.Tensor):
    """Make t's GPU the current device for the launches (Triton launches on the current
    device's current stream): tensors on cuda:1 with cuda:0 current would otherwise fault or
    run unordered with the caller's stream. No-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(q, k, v, cos, sin, pos_map, full_lengths, causal: bool, scale: float, config=None):
    bsz, hq, nu, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nf = pos_map.shape[1]
    interp = _interpreting()
    capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else (9, 0)
    cfg = attention_config(dim, q.dtype, interp, capability)
    if config:
        cfg.update(config)
    grp = grouping_config(interp)
    # Offsets inside one (batch, head) slice are int32 in the kernel.
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[-2:], t.stride()[-2:]))
        if span >= 2**31:
            raise ValueError(f"{name}: one (batch, head) slice spans {span} elements; the Triton kernel needs < 2**31")
    heads = cfg.get("GROUP_HEADS") or group_heads(group, cfg["BLOCK_M"])
    block_s = cfg["BLOCK_M"] // heads
    num_tiles = triton.cdiv(nf, block_s)
    chunks = triton.cdiv(group, heads)
    # The carry of rows still open at a step's end: one entry per program and head, indexed by
    # the program's first row or by its tile, whichever is fewer.
    carry_by_row = nu < num_tiles
    num_carry = min(nu, num_tiles)
    if hq * num_carry * dim >= 2**31 or hq * nu * dim >= 2**31:
        raise ValueError(f"one image's output/carry buffer spans >= 2**31 elements (Hq={hq}, Nu={nu}, Nf={nf}, D={dim})")
    full_lengths = full_lengths.to(torch.int32)
    out = empty((bsz, hq, nu, dim), q.dtype, q.device)
    # Extra memory: the grouping (int32 [B, Nf] + 2 x [B, Nu]) and the fp32 carry [B, Hq,
    # min(Nu, num_tiles), D]; nothing of size Nf x D. Poisoned too under poison_outputs(), so a
    # read of an unwritten entry fails the tests.
    row_start = empty((bsz, nu), torch.int32, q.device)
    row_count = empty((bsz, nu), torch.int32, q.device)
    order = empty((bsz, nf), torch.int32, q.device)
    carry = empty((bsz, hq, num_carry, dim), torch.float32, q.device)
    with _device_guard(q):
        vtu_group_rows_kernel[(triton.cdiv(nu, grp["BLOCK_R"]), bsz)](
            pos_map, full_lengths, row_start, row_count, order, *pos_map.stride(), nu, nf,
            BLOCK_R=grp["BLOCK_R"], BLOCK_P=grp["BLOCK_P"], num_warps=4,
        )
        vtu_attention_fwd_kernel[(num_tiles, bsz * hkv * chunks)](
            q, k, v, cos, sin, pos_map, full_lengths, order, row_start, row_count, out, carry,
            *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), *pos_map.stride(),
            *out.stride(), hq, group, nu, nf, num_carry, int(carry_by_row), float(scale) * LOG2_E,
            HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_D=cfg["BLOCK_D"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_HEADS=heads, CAUSAL=bool(causal),
            DOT_FP32=interp or q.dtype == torch.float32, INPUT_PRECISION="ieee",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        vtu_zero_empty_rows_kernel[(triton.cdiv(nu, grp["BLOCK_R"]), bsz, hq)](
            row_count, out, *out.stride(), hq, nu,
            HEAD_DIM=dim, BLOCK_R=grp["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=4,
        )
    return out


@torch.library.custom_op("dymu::triton_vtu_attention", mutates_args=())
def _vtu_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    full_lengths: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    return _launch(q, k, v, cos, sin, pos_map, full_lengths, causal, scale)


@_vtu_attention_op.register_fake
def _vtu_attention_fake(q, k, v, cos, sin, pos_map, full_lengths, causal, scale):
    return q.new_empty(q.shape)


def vtu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    full_lengths: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Fused VTU attention (the semantics of ``dk.vtu_attention``; normalised arguments).

    Args:
        q: [B, Hq, Nu, D] fp16/bf16/fp32 merged queries (RoPE not applied), any strides;
            D even, <= 128.
        k, v: [B, Hkv, Nu, D] same dtype, Hq % Hkv == 0.
        cos, sin: [B, Nf', D] (stride-0 broadcast views allowed), Nf' >= Nf, any float dtype.
        pos_map: [B, Nf] int32, merged row of each full position.
        full_lengths: [B] int32 valid positions per image (map entries beyond may be -1).
        causal: causal mask on full positions. scale: softmax scale.

    Returns:
        [B, Hq, Nu, D] in q.dtype: per merged row, the mean attention output of its valid
        positions; 0 for rows with none. Bit-identical run to run.
    """
    return _vtu_attention_op(q, k, v, cos, sin, pos_map, full_lengths, bool(causal), float(scale))


ATTN_ARGS = [
    "Q", "K", "V", "COS", "SIN", "POS_MAP", "FULL_LEN", "ORDER", "ROW_START", "ROW_COUNT", "OUT", "CARRY",
    "stride_qb", "stride_qh", "stride_qn", "stride_qd",
    "stride_kb", "stride_kh", "stride_kn", "stride_kd",
    "stride_vb", "stride_vh", "stride_vn", "stride_vd",
    "stride_cb", "stride_cn", "stride_cd",
    "stride_sb", "stride_sn", "stride_sd",
    "stride_mb", "stride_mn",
    "stride_outb", "stride_outh", "stride_outn", "stride_outd",
    "num_heads", "num_kv_groups", "num_merged", "num_full", "num_carry", "carry_by_row", "qk_scale",
]
# (D, GQA group) pairs compiled: the common LLM head dims, padded ones, and packed groups
# (GROUP_HEADS = group_heads(group, BLOCK_M), as the launcher picks it).
_SPEC_SHAPES = [(64, 1), (64, 7), (72, 4), (80, 4), (96, 2), (128, 1), (128, 7)]


def _specs():
    """COMPILE_SPECS: every kernel as ``_launch`` really launches it on a GPU.

    Each q/k/v dtype with cos/sin in fp32 (what the model layer passes) and in q's dtype, the
    block sizes of ``attention_config`` per architecture, and the runtime's specialisation
    of the HF layout (q/k/v [B, H, N, D] views of [B, N, H, D], contiguous cos/sin or a
    stride-0 batch view, contiguous int32 map): pointers and every stride that is a multiple
    of D (D % 16 == 0) divisible by 16, unit column strides equal to 1. The integer sizes
    are do_not_specialize, so they stay plain i32.
    """
    specs = []
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    combos = [(torch.float16, torch.float32), (torch.float16, torch.float16),
              (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
              (torch.float32, torch.float32)]
    unit = ["stride_qd", "stride_kd", "stride_vd", "stride_cd", "stride_sd", "stride_mn", "stride_outd"]
    for dtype, cs_dtype in combos:
        for dim, group in _SPEC_SHAPES:
            for arch, capability in ((90, (9, 0)), (80, (8, 0))):
                cfg = attention_config(dim, dtype, capability=capability)
                heads = group_heads(group, cfg["BLOCK_M"])
                sig = {name: "i32" for name in ATTN_ARGS}
                sig.update(Q=ptr[dtype], K=ptr[dtype], V=ptr[dtype], COS=ptr[cs_dtype], SIN=ptr[cs_dtype],
                           POS_MAP="*i32", FULL_LEN="*i32", ORDER="*i32", ROW_START="*i32", ROW_COUNT="*i32",
                           OUT=ptr[dtype], CARRY="*fp32", qk_scale="fp32")
                consts = dict(HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_D=cfg["BLOCK_D"],
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_HEADS=heads, CAUSAL=True,
                              DOT_FP32=dtype == torch.float32, INPUT_PRECISION="ieee")
                sig.update({name: "constexpr" for name in consts})
                divisible = ["Q", "K", "V", "COS", "SIN", "POS_MAP", "FULL_LEN", "ORDER", "ROW_START",
                             "ROW_COUNT", "OUT", "CARRY", "stride_cb", "stride_sb"]
                if dim % 16 == 0:
                    divisible += ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                                  "stride_vb", "stride_vh", "stride_vn", "stride_cn", "stride_sn",
                                  "stride_outb", "stride_outh", "stride_outn"]
                specs.append(dict(
                    kernel=vtu_attention_fwd_kernel, signature=sig, constexprs=consts,
                    specialize={"divisible_by_16": divisible, "equal_to_1": unit}, vectorized_loads=dim % 16 == 0,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], archs=[arch],
                    name=f"vtu_attention_fwd D={dim} G={heads} {names[dtype]} cos {names[cs_dtype]} "
                         f"BM={cfg['BLOCK_M']} BN={cfg['BLOCK_N']} w={cfg['num_warps']}",
                ))
    grp = grouping_config()
    specs.append(dict(
        kernel=vtu_group_rows_kernel,
        signature={"POS_MAP": "*i32", "FULL_LEN": "*i32", "ROW_START": "*i32", "ROW_COUNT": "*i32",
                   "ORDER": "*i32", "stride_mb": "i32", "stride_mn": "i32", "num_merged": "i32",
                   "num_full": "i32", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"},
        constexprs=dict(BLOCK_R=grp["BLOCK_R"], BLOCK_P=grp["BLOCK_P"]), num_warps=4,
        specialize={"divisible_by_16": ["POS_MAP", "FULL_LEN", "ROW_START", "ROW_COUNT", "ORDER"],
                    "equal_to_1": ["stride_mn"]},
        name="vtu_group_rows",
    ))
    zero_args = ["stride_outb", "stride_outh", "stride_outn", "stride_outd", "num_heads", "num_merged"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for dim in sorted({dim for dim, _ in _SPEC_SHAPES}):
            sig = {"ROW_COUNT": "*i32", "OUT": ptr[dtype]}
            sig.update({name: "i32" for name in zero_args})
            consts = dict(HEAD_DIM=dim, BLOCK_R=grp["BLOCK_R"], BLOCK_D=_pow2_at_least_16(dim))
            sig.update({name: "constexpr" for name in consts})
            divisible = ["ROW_COUNT", "OUT"]
            if dim % 16 == 0:
                divisible += ["stride_outb", "stride_outh", "stride_outn"]
            specs.append(dict(kernel=vtu_zero_empty_rows_kernel, signature=sig, constexprs=consts, num_warps=4,
                              specialize={"divisible_by_16": divisible, "equal_to_1": ["stride_outd"]},
                              name=f"vtu_zero_empty_rows D={dim} {names[dtype]}"))
    return specs


COMPILE_SPECS = _specs()
