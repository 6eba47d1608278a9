"""Triton backend of the packed varlen ops: launcher and compile specs.

``proportional_attention_varlen`` takes the normalised arguments of
``dymu_kernels.varlen.reference.proportional_attention_varlen`` and launches the
FlashAttention-2-style kernel of ``triton_kernels.py`` plus one kernel that zeroes the rows past
the packed total. No host sync: the grid is sized by a static bound on any image's length
(``max_seqlen`` when the caller knows one, else T), and programs past an image's length exit at
once. No per-length recompilation (lengths live on the device; the bound is do_not_specialize),
no autotuning.

``dtome_merge_varlen`` runs the DToMe kernels of ``dymu_kernels.dtome.triton_kernels`` in their
PACKED mode on the packed rows themselves: similarity (+ split combine), selection (image-local
new rows into a [T] scratch), a device cumsum of the new lengths (the new cu_seqlens; no host
sync, no .item()), grouping (which also writes the packed row_map) and merge (which also zeroes
the rows past the new total and composes pos_map). Scratch is [T] int32 rows plus the
[B, ceil(W/2)] best-edge scratch (W = ``max_seqlen`` when given, else T): no [B, W, D] or
[B, W, C] gather of x or metric is allocated. ``max_seqlen`` only bounds the grids (every image
gets cdiv(W, block) programs; without it cdiv(T, block), most of them idle). Unvalidated
offsets act as clamped into [0, T] and non-decreasing (three tiny device ops); with an
unvalidated ``max_seqlen`` below a real length, that image's rows past W are dropped (their
row_map entries are unspecified), but nothing is read or written outside the T rows.
Limitations: inference only; the attention's head dim D even and <= 128, the merge's metric dim
C <= 128; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
"""

import math
import os

import torch
import triton

from .._alloc import empty
from .triton_kernels import varlen_attention_fwd_kernel, zero_tail_rows_kernel

SUPPORTED = frozenset({"proportional_attention_varlen", "dtome_merge_varlen"})

LOG2_E = 1.0 / math.log(2.0)
ZERO_BLOCK = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dtome_merge_varlen(x, metric, size, cu_seqlens, threshold, pos_map, protect_first, max_seqlen=0):
    """Normalised arguments of ``reference.dtome_merge_varlen``; see the module docstring.

    x [T, D] and metric [T, C] (any strides), size [T] float32, cu_seqlens [B + 1] int32,
    threshold [B] float32, pos_map int32 of any shape (packed rows) or None; max_seqlen: a bound
    W on every image's length (0: T). Returns DToMeVarlenResult.
    """
    from ..dtome import triton as padded
    from ..dtome.triton_kernels import (
        group_rows_kernel, merge_kernel, select_kernel, similarity_combine_kernel, similarity_kernel,
    )
    from .reference import DToMeVarlenResult

    num_rows, dim = x.shape
    batch = cu_seqlens.shape[0] - 1
    width = max_seqlen if 0 < max_seqlen <= num_rows else num_rows
    device = x.device
    x_out = empty((num_rows, dim), x.dtype, device)
    size_out = empty((num_rows,), torch.float32, device)
    row_map = empty((num_rows,), torch.int32, device)
    new_cu = empty((batch + 1,), torch.int32, device)
    pos_flat = pos_map.reshape(-1).contiguous() if pos_map is not None else row_map  # a dummy when absent
    pos_out = empty((pos_flat.numel(),), torch.int32, device) if pos_map is not None else row_map
    # Unvalidated GPU offsets act as clamped into [0, T] and non-decreasing: every kernel then
    # stays inside the T rows (a no-op for valid offsets; device ops, no sync).
    cu = torch.cummax(cu_seqlens.clamp(0, num_rows), dim=0).values.to(torch.int32)
    # Scratch, all [T] or [B, ceil(W / 2)]: nothing of B * W * D.
    new_lengths = torch.empty((batch,), dtype=torch.int32, device=device)
    local_map = torch.empty((num_rows,), dtype=torch.int32, device=device)  # image-local new rows
    order, key, start, count = (torch.empty((num_rows,), dtype=torch.int32, device=device) for _ in range(4))
    num_src = (width + 1) // 2
    with padded._device_guard(device):
        if batch > 0:
            cfg = padded._similarity_config(width, metric.shape[1], batch, metric.dtype)
            splits, dst_per_split = cfg.pop("splits"), cfg.pop("dst_per_split")
            node_max = torch.empty((batch, num_src), dtype=torch.float32, device=device)
            node_idx = torch.empty((batch, num_src), dtype=torch.int32, device=device)
            if splits > 1:
                part_max = torch.empty((splits, batch, num_src), dtype=torch.float32, device=device)
                part_idx = torch.empty((splits, batch, num_src), dtype=torch.int32, device=device)
            else:
                part_max, part_idx = node_max, node_idx
            similarity_kernel[(triton.cdiv(num_src, cfg["BLOCK_A"]), splits, batch)](
                metric, cu, part_max, part_idx, width, metric.shape[1], 0, *metric.stride(), dst_per_split,
                PROTECT_FIRST=protect_first, PACKED=True, **cfg,
            )
            if splits > 1:
                total = batch * num_src
                similarity_combine_kernel[(triton.cdiv(total, 1024),)](
                    part_max, part_idx, node_max, node_idx, total, splits, BLOCK=1024, num_warps=4
                )
            select_kernel[(batch,)](
                node_max, node_idx, cu, threshold.contiguous(), local_map, new_lengths, width,
                PROTECT_FIRST=protect_first, PACKED=True, **padded._select_config(width),
            )
        # The new offsets: an exclusive cumsum of the new lengths, on the device.
        new_cu[:1] = 0
        torch.cumsum(new_lengths, 0, dtype=torch.int32, out=new_cu[1:])
        gcfg = padded._group_config(width)
        group_rows_kernel[(triton.cdiv(width, gcfg["BLOCK_I"]), batch + 1)](
            local_map, order, key, start, count, cu, new_cu, row_map, width, num_rows, PACKED=True, **gcfg
        )
        mcfg = padded._merge_config(width, dim, _interpreting())
        grid = (triton.cdiv(width, mcfg["BLOCK_R"]), batch + 1, max(1, triton.cdiv(dim, mcfg["BLOCK_D"])))
        merge_kernel[grid](
            x, size.contiguous(), order, key, start, count, row_map, x_out, size_out, pos_flat, pos_out,
            cu, new_cu, width, dim, pos_flat.numel() if pos_map is not None else 0, num_rows,
            0, *x.stride(), HAS_POS_MAP=pos_map is not None, PACKED=True,
            BF16_BY_BITS=x.dtype == torch.bfloat16 and _interpreting(), **mcfg,
        )
    new_pos = pos_out.reshape(pos_map.shape) if pos_map is not None else None
    return DToMeVarlenResult(x_out, size_out, new_cu, new_pos, row_map)


def attention_config(head_dim: int, dtype: torch.dtype, interpreter: bool = False) -> dict:
    """Block sizes and launch options for this D and dtype (BLOCK_D: D padded to a power of two
    >= 16, since tl.dot needs K >= 16). fp16/bf16 on a GPU dot in the input dtype (DOT_INPUT)."""
    cfg = dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    if interpreter:
        cfg.update(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, DOT_INPUT=False)
    elif dtype == torch.float32:  # IEEE fp32 dots on CUDA cores: small tiles keep registers
        cfg.update(BLOCK_M=64 if cfg["BLOCK_D"] <= 64 else 32, BLOCK_N=32 if cfg["BLOCK_D"] <= 64 else 16,
                   num_warps=8, num_stages=1, DOT_INPUT=False)
    elif cfg["BLOCK_D"] <= 64:
        cfg.update(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, DOT_INPUT=True)
    else:
        cfg.update(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2, DOT_INPUT=True)
    return cfg


def proportional_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    max_seqlen: int = 0,
) -> torch.Tensor:
    """q, k, v [T, H, D] (last dim contiguous), size [T] float32, cu_seqlens [B + 1] int32 ->
    out [T, H, D] in q.dtype; max_seqlen: a bound on any image's length (0: T)."""
    num_rows, heads, dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    size = size.contiguous()
    # The interpreter rounds fp32 -> bf16 stores wrongly (it acts on raw bits): there the kernel
    # writes fp32 and torch rounds once at the end.
    bf16_via_fp32 = q.dtype == torch.bfloat16 and _interpreting()
    out = empty(q.shape, torch.float32 if bf16_via_fp32 else q.dtype, q.device)
    cfg = attention_config(dim, q.dtype, _interpreting())
    bound = max_seqlen if 0 < max_seqlen <= num_rows else num_rows
    blocks = triton.cdiv(bound, cfg["BLOCK_M"])
    varlen_attention_fwd_kernel[(blocks, batch, heads)](
        q, k, v, size, cu_seqlens, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2_E,
        HEAD_DIM=dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        DOT_INPUT=cfg["DOT_INPUT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    width = heads * dim
    zero_tail_rows_kernel[(triton.cdiv(num_rows * width, ZERO_BLOCK),)](
        out, cu_seqlens, batch, num_rows, width, BLOCK=ZERO_BLOCK
    )
    return out.to(torch.bfloat16) if bf16_via_fp32 else out


def _specs():
    """COMPILE_SPECS: every kernel with the block sizes the launcher really uses on a GPU."""
    specs = []
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    strides = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh"]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for dim in (64, 72, 80, 128):
            cfg = attention_config(dim, dtype)
            sig = {name: "i32" for name in strides}
            sig.update(Q=ptr[dtype], K=ptr[dtype], V=ptr[dtype], SIZE="*fp32", CU="*i32", O=ptr[dtype],
                       qk_scale="fp32")
            order = ["Q", "K", "V", "SIZE", "CU", "O", *strides, "qk_scale"]
            consts = dict(HEAD_DIM=dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          DOT_INPUT=cfg["DOT_INPUT"])
            for name in consts:
                sig[name] = "constexpr"
            specs.append(dict(
                name=f"varlen_attention_fwd {names[dtype]} D={dim}", kernel=varlen_attention_fwd_kernel,
                signature={name: sig[name] for name in order + list(consts)}, constexprs=consts,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            ))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        specs.append(dict(
            name=f"zero_tail_rows {names[dtype]}", kernel=zero_tail_rows_kernel,
            signature={"OUT": ptr[dtype], "CU": "*i32", "num_batch": "i32", "num_rows": "i32", "row_width": "i32",
                       "BLOCK": "constexpr"},
            constexprs=dict(BLOCK=ZERO_BLOCK), num_warps=4,
        ))
    return specs


def _merge_specs():
    """The PACKED variants of the DToMe kernels that ``dtome_merge_varlen`` launches."""
    from ..dtome.triton import kernel_specs

    return kernel_specs(packed=True)


COMPILE_SPECS = _specs() + _merge_specs()
