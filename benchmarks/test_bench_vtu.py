"""VTU attention latency: per backend vs the official fast path (gather, RoPE, SDPA, mean).

Shapes from real models: SmolLM2-135M (Hq=9, Hkv=3, D=64, Nf=640, Nu=140), LLaVA-1.5-7B
(Hq=Hkv=32, D=128, Nf~640, Nu 130/240/430), LLaVA-OV Qwen2-7B (Hq=28, Hkv=4, D=128, Nf 3.7k,
Nu ~30% of the image part; GPU only, the 9.5k shape too). FLOPs counted as full-length causal
attention: 2 * 2 * Nf^2 * D * Hq / 2.
"""

import pytest
import torch

import dymu_kernels as dk
from baselines import fast_path_vtu_attention
from harness import DEVICE, kernel_backends, sync
from memory import peak_bytes
from roofline import vtu_attention_cost

# name: (Hq, Hkv, D, text_prefix, image_tokens, text_suffix, image_rows_kept)
SHAPES = {
    "SmolLM2-135M Nu=140": (9, 3, 64, 40, 576, 24, 76),
    "LLaVA-1.5-7B Nu=130": (32, 32, 128, 35, 576, 29, 66),
    "LLaVA-1.5-7B Nu=240": (32, 32, 128, 35, 576, 29, 176),
    "LLaVA-1.5-7B Nu=430": (32, 32, 128, 35, 576, 29, 366),
}
if DEVICE.type == "cuda":
    SHAPES["LLaVA-OV-Qwen2-7B Nf=3.7k"] = (28, 4, 128, 60, 3600, 40, 1080)
    SHAPES["LLaVA-OV-Qwen2-7B Nf=9.5k"] = (28, 4, 128, 60, 9400, 40, 2820)
IMPLS = ["fast-path", *kernel_backends("vtu_attention")]


def make_call(name: str, dtype: torch.dtype):
    hq, hkv, d, prefix, image, suffix, kept = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    groups = torch.sort(torch.cat([torch.arange(kept), torch.randint(0, kept, (image - kept,), generator=g)])).values
    pos_map = torch.cat([torch.arange(prefix), prefix + groups, prefix + kept + torch.arange(suffix)])[None]
    nu, nf = prefix + kept + suffix, pos_map.shape[1]
    q = torch.randn(1, hq, nu, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(1, hkv, nu, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(1, hkv, nu, d, generator=g).to(DEVICE, dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(nf).float(), inv_freq).repeat(1, 2)
    return q, k, v, emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype), pos_map.to(DEVICE, torch.int32)


DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cpu" else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_vtu_attention(benchmark, shape, dtype, impl):
    q, k, v, cos, sin, pos_map = make_call(shape, dtype)
    if impl == "fast-path":
        def run():
            out = fast_path_vtu_attention(q, k, v, cos, sin, pos_map)
            sync()
            return out
    else:
        def run():
            out = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend=impl)
            sync()
            return out
    nf, hq, d = pos_map.shape[1], q.shape[1], q.shape[3]
    benchmark.group = f"vtu_attention {shape} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(impl=impl, op="vtu_attention", shape=f"{shape} {dtype}", device=str(DEVICE),
                                flops=2 * 2 * nf * nf * d * hq / 2, peak_bytes=peak_bytes(run),
                                roofline=vtu_attention_cost(1, hq, k.shape[1], d, nf, q.shape[2],
                                                            str(dtype).replace("torch.", "")).as_dict())
    out = benchmark(run)
    assert out.shape == q.shape and not out.isnan().any()
