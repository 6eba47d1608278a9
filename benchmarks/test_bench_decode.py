"""Decode-step attention of one layer from a merged KV cache vs SDPA over the full rotated cache.

One new query token per sequence. Baseline "full-cache-sdpa": what HF runs on its standard cache
(every full position holds its own rotated K/V): SDPA of the rotated query over [B, Hkv, P, D].
The other implementations run ``dk.vtu_decode_attention`` on the merged cache (R unrotated rows
+ the int32 map), RoPE applied to keys as they are read.

Shapes: LLaVA-1.5-7B (Hq = Hkv = 32, D = 128, 576 image + 64 text positions, DyMU-low/mid/high
keep 89/195/394 image rows) and LLaVA-OneVision-7B (Hq = 28, Hkv = 4, D = 128, 7290 image + 64
text positions, 15/30/60 % of the image rows kept). B = 1 and 16; on CPU the OneVision shape runs
at B = 1 and 4 (B = 16 needs ~0.5 GB per layer of fp32 full cache and minutes per case on the
shared 2-core machine). ``extra_info`` records both caches' bytes (image + text, one layer; the
map is counted as 4 bytes per position).
"""

import pytest
import torch
import torch.nn.functional as F

import dymu_kernels as dk
from harness import DEVICE, kernel_backends, sync

TEXT = 64
# name: (Hq, Hkv, D, image positions, image rows kept)
MODELS = {
    "LLaVA-1.5-7B low": (32, 32, 128, 576, 89),
    "LLaVA-1.5-7B mid": (32, 32, 128, 576, 195),
    "LLaVA-1.5-7B high": (32, 32, 128, 576, 394),
    "LLaVA-OV-7B 15%": (28, 4, 128, 7290, round(0.15 * 7290)),
    "LLaVA-OV-7B 30%": (28, 4, 128, 7290, round(0.30 * 7290)),
    "LLaVA-OV-7B 60%": (28, 4, 128, 7290, round(0.60 * 7290)),
}
BATCHES = {"LLaVA-1.5": (1, 16), "LLaVA-OV": (1, 16) if DEVICE.type == "cuda" else (1, 4)}
SHAPES = [f"{name} B={b}" for name, cfg in MODELS.items() for b in BATCHES[name.split("-7B")[0]]]
IMPLS = ["full-cache-sdpa", *kernel_backends("vtu_decode_attention")]
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def rope_tables(num_pos: int, dim: int):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.outer(torch.arange(num_pos).float(), inv_freq).repeat(1, 2)
    return emb.cos(), emb.sin()


def make_case(shape: str):
    name, b = shape.rsplit(" B=", 1)
    bsz = int(b)
    hq, hkv, d, image, kept = MODELS[name]
    g = torch.Generator().manual_seed(0)
    num_pos, num_rows = image + TEXT, kept + TEXT
    maps = []
    for _ in range(bsz):
        groups = torch.sort(torch.cat([torch.arange(kept), torch.randint(0, kept, (image - kept,), generator=g)])).values
        maps.append(torch.cat([groups, kept + torch.arange(TEXT)]))
    pos_map = torch.stack(maps).to(torch.int32)
    cos, sin = rope_tables(num_pos + 1, d)
    q = torch.randn(bsz, hq, 1, d, generator=g)
    k_rows = torch.randn(bsz, hkv, num_rows, d, generator=g)
    v_rows = torch.randn(bsz, hkv, num_rows, d, generator=g)
    # the full cache HF would hold: every position's row, rotated at the position
    index = pos_map.long()[:, None, :, None].expand(bsz, hkv, num_pos, d)
    k_full = k_rows.gather(2, index)
    half = d // 2
    k_full = k_full * cos[:num_pos] + torch.cat([-k_full[..., half:], k_full[..., :half]], -1) * sin[:num_pos]
    v_full = v_rows.gather(2, index)
    q_positions = torch.full((bsz, 1), num_pos - 1, dtype=torch.int32)  # the newest token attends to all
    to = lambda t: t.to(DEVICE, DTYPE if t.is_floating_point() else t.dtype)  # noqa: E731
    return dict(
        q=to(q), k_rows=to(k_rows), v_rows=to(v_rows), cos=cos.to(DEVICE), sin=sin.to(DEVICE),
        pos_map=pos_map.to(DEVICE), q_positions=q_positions.to(DEVICE), k_full=to(k_full), v_full=to(v_full),
        bsz=bsz, hq=hq, hkv=hkv, d=d, num_pos=num_pos, num_rows=num_rows,
    )  # fmt: skip


def cache_bytes(case) -> dict:
    elt = torch.empty(0, dtype=DTYPE).element_size()
    bsz, hkv, d = case["bsz"], case["hkv"], case["d"]
    full = 2 * bsz * hkv * case["num_pos"] * d * elt
    merged = 2 * bsz * hkv * case["num_rows"] * d * elt + 4 * bsz * case["num_pos"]
    return {"full_cache_bytes": full, "merged_cache_bytes": merged, "cache_ratio": full / merged}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention(benchmark, shape, impl):
    case = make_case(shape)
    q = case["q"]
    if impl == "full-cache-sdpa":
        d, pos = case["d"], case["num_pos"] - 1
        half = d // 2
        cos_q, sin_q = case["cos"][pos].to(DTYPE), case["sin"][pos].to(DTYPE)

        def run():
            q_rot = q * cos_q + torch.cat([-q[..., half:], q[..., :half]], -1) * sin_q
            out = F.scaled_dot_product_attention(q_rot, case["k_full"], case["v_full"], enable_gqa=case["hq"] != case["hkv"])
            sync()
            return out
    else:
        del case["k_full"], case["v_full"]

        def run():
            out = dk.vtu_decode_attention(
                q, case["k_rows"], case["v_rows"], case["cos"], case["sin"], case["pos_map"], case["q_positions"], backend=impl
            )
            sync()
            return out

    benchmark.group = f"vtu_decode_attention {shape}"
    benchmark.extra_info.update(impl=impl, op="vtu_decode_attention", shape=shape, device=str(DEVICE),
                                dtype=str(DTYPE).replace("torch.", ""), **cache_bytes(case))
    out = benchmark(run)
    assert out.shape == q.shape and not out.isnan().any()
