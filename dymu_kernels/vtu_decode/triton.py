"""Triton backend of decode attention over a merged KV cache: launcher, custom op, compile specs.

``vtu_decode_attention`` takes the normalised arguments of the reference and runs the two
flash-decoding kernels of ``triton_kernels.py`` (split over positions, then a deterministic
combine). No host sync (lengths and positions stay on the device; the number of splits comes
from the static P), no per-length recompilation (sizes are do_not_specialize), no autotuning.

Memory beyond the output: fp32 partials, queries x splits x (2 + D) floats.

Limitations: inference only; D even, <= 128; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (tests).
"""

import math
import os

import torch
import triton

from .._alloc import empty
from .triton_kernels import vtu_decode_combine_kernel, vtu_decode_split_kernel

SUPPORTED = frozenset({"vtu_decode_attention"})

LOG2_E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def decode_config(head_dim: int, interpreter: bool = False) -> dict:
    """Tile sizes: BLOCK_HALF pads D/2 to a power of two; SPLIT positions per program."""
    cfg = dict(BLOCK_HALF=max(8, triton.next_power_of_2(head_dim // 2)))
    if interpreter:
        cfg.update(BLOCK_N=8, SPLIT=16, BLOCK_S=4, num_warps=4)
    else:
        cfg.update(BLOCK_N=16 if head_dim > 64 else 64, SPLIT=256, BLOCK_S=32, num_warps=4)
    return cfg


def _launch(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, scale: float):
    bsz, hq, tq, dim = q.shape
    hkv, num_rows = k_rows.shape[1], k_rows.shape[2]
    num_pos = pos_map.shape[1]
    cfg = decode_config(dim, _interpreting())
    for name, t in (("k_rows", k_rows), ("v_rows", v_rows), ("cos", cos), ("sin", sin)):
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[-2:], t.stride()[-2:]))
        if span >= 2**31:
            raise ValueError(f"{name}: one (batch, head) slice spans {span} elements; the Triton kernel needs < 2**31")
    out = empty((bsz, hq, tq, dim), q.dtype, q.device)
    num_splits = triton.cdiv(num_pos, cfg["SPLIT"])
    queries = bsz * hq * tq
    m = torch.empty((queries, num_splits), dtype=torch.float32, device=q.device)
    l = torch.empty((queries, num_splits), dtype=torch.float32, device=q.device)  # noqa: E741
    acc = torch.empty((queries, num_splits, 2 * cfg["BLOCK_HALF"]), dtype=torch.float32, device=q.device)
    vtu_decode_split_kernel[(num_splits, queries)](
        q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, m, l, acc,
        *q.stride(), *k_rows.stride(), *v_rows.stride(), *cos.stride(), *sin.stride(),
        *pos_map.stride(), *q_positions.stride(),
        hq, hq // hkv, tq, num_rows, num_pos, num_splits, float(scale) * LOG2_E,
        HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg["SPLIT"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    # The interpreter rounds fp32 -> bf16 stores by truncation: there, round in torch instead.
    target = torch.empty(out.shape, dtype=torch.float32, device=q.device) if (
        q.dtype == torch.bfloat16 and _interpreting()) else out
    vtu_decode_combine_kernel[(queries,)](
        m, l, acc, target, *target.stride(), hq, tq, num_splits,
        HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    if target is not out:
        out.copy_(target)
    return out


@torch.library.custom_op("dymu::triton_vtu_decode_attention", mutates_args=())
def _vtu_decode_attention_op(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    q_positions: torch.Tensor,
    full_lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _launch(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, scale)


@_vtu_decode_attention_op.register_fake
def _vtu_decode_attention_fake(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, scale):
    return q.new_empty(q.shape)


def vtu_decode_attention(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos_map: torch.Tensor,
    q_positions: torch.Tensor,
    full_lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Flash-decoding over a merged cache (the semantics of ``dk.vtu_decode_attention``).

    Args (normalised by the api): q [B, Hq, Tq, D] fp16/bf16/fp32 (any strides); k_rows, v_rows
    [B, Hkv, R, D] in q.dtype; cos, sin [B, P', D] any float dtype (stride-0 batch views
    allowed); pos_map [B, P] int32; q_positions [B, Tq] int32; full_lengths [B] int32; scale.

    Returns:
        [B, Hq, Tq, D] in q.dtype; bit-identical run to run.
    """
    return _vtu_decode_attention_op(q, k_rows, v_rows, cos, sin, pos_map, q_positions, full_lengths, float(scale))


def _specs():
    """COMPILE_SPECS: both kernels with the tile sizes ``_launch`` uses on a GPU."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    split_args = [
        "stride_qb", "stride_qh", "stride_qt", "stride_qd",
        "stride_kb", "stride_kh", "stride_kr", "stride_kd",
        "stride_vb", "stride_vh", "stride_vr", "stride_vd",
        "stride_cb", "stride_cp", "stride_cd", "stride_sb", "stride_sp", "stride_sd",
        "stride_mb", "stride_mp", "stride_pb", "stride_pt",
        "num_heads", "num_kv_groups", "num_queries", "num_rows", "num_pos", "num_splits",
    ]  # fmt: skip
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for dim in (64, 80, 128):
            cfg = decode_config(dim)
            sig = {name: "i32" for name in split_args}
            sig.update(Q=ptr[dtype], K=ptr[dtype], V=ptr[dtype], COS="*fp32", SIN="*fp32", POS_MAP="*i32",
                       QPOS="*i32", FULL_LEN="*i32", M_OUT="*fp32", L_OUT="*fp32", ACC_OUT="*fp32", qk_scale="fp32")
            consts = dict(HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg["SPLIT"])
            sig.update({name: "constexpr" for name in consts})
            specs.append(dict(kernel=vtu_decode_split_kernel, signature=sig, constexprs=consts, num_warps=cfg["num_warps"],
                              name=f"vtu_decode_split D={dim} {names[dtype]} BN={cfg['BLOCK_N']} SPLIT={cfg['SPLIT']}"))
            csig = {"M_IN": "*fp32", "L_IN": "*fp32", "ACC_IN": "*fp32", "OUT": ptr[dtype]}
            csig.update({n: "i32" for n in ("stride_ob", "stride_oh", "stride_ot", "stride_od", "num_heads", "num_queries", "num_splits")})
            cconsts = dict(HEAD_DIM=dim, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_S=cfg["BLOCK_S"])
            csig.update({name: "constexpr" for name in cconsts})
            specs.append(dict(kernel=vtu_decode_combine_kernel, signature=csig, constexprs=cconsts, num_warps=cfg["num_warps"],
                              name=f"vtu_decode_combine D={dim} {names[dtype]}"))
    return specs


COMPILE_SPECS = _specs()
