"""The op demo: every op on a realistic shape with every available backend.

A CLIP ViT-L/14-336 merge step (N = 577 tokens with CLS, metric C = 64, features D = 1024) on
a batch of synthetic images whose patches form clusters of different sizes (so different
images keep different numbers of tokens), and a LLaVA-1.5-like VTU call (32 heads, D = 128,
a text prefix, merged image tokens and a text suffix). Prints tokens kept per image, parity
of every backend against the reference, and time per backend.
"""

import time
from typing import Callable, Dict, List

import torch

import dymu_kernels as dk
from dymu_kernels._backends import BACKENDS, implements


def clustered_tokens(batch: int, n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, n, dim] tokens drawn around 8..200 centres per image (fewer centres: more merges)."""
    out = []
    for b in range(batch):
        centres = 8 + (192 * b) // max(batch - 1, 1)
        basis = torch.randn(centres, dim, generator=generator)
        assign = torch.randint(0, centres, (n,), generator=generator)
        out.append(basis[assign] + 0.15 * torch.randn(n, dim, generator=generator))
    return torch.stack(out)


def _time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _backends_for(op: str) -> List[str]:
    usable = []
    for name in BACKENDS:
        if name == "triton" and not torch.cuda.is_available():
            continue  # the interpreter is for tests, not timing
        if implements(name, op):
            usable.append(name)
    return usable


def _parity(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype in (torch.int32, torch.int64):
        return "identical" if torch.equal(a, b) else f"{int((a != b).sum())} entries differ"
    return f"max |diff| {float((a.float() - b.float()).abs().max()):.2e}"


def run_dtome(device: torch.device, batch: int = 8) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    n, c, d = 577, 64, 1024
    metric = clustered_tokens(batch, n, c, g).to(device)
    x = torch.randn(batch, n, d, generator=g).to(device)
    size = torch.ones(batch, n, device=device)
    lengths = torch.full((batch,), n, dtype=torch.int32, device=device)
    node_max, _ = dk.bipartite_similarity(metric, lengths, protect_first=True, backend="reference")
    tau = dk.batch_threshold(node_max, 21, backend="reference")
    print(f"DToMe merge step, CLIP ViT-L/14-336 shape: B={batch}, N={n}, C={c}, D={d}; "
          f"threshold {float(tau):.4f} (calibrated for 21 merges per image on this batch)")
    ref = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend="reference")
    print("  tokens kept per image:", ref.lengths.tolist())
    timings = {}
    for name in _backends_for("dtome_merge"):
        res = dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend=name)
        seconds = _time(lambda: dk.dtome_merge(x, metric, size, lengths, tau, protect_first=True, backend=name))
        timings[name] = seconds
        print(f"  {name:<10} {seconds * 1e3:8.2f} ms   lengths {_parity(res.lengths, ref.lengths)}, "
              f"row_map {_parity(res.row_map, ref.row_map)}, x {_parity(res.x, ref.x)}")
    return timings


def run_vtu(device: torch.device) -> Dict[str, float]:
    g = torch.Generator().manual_seed(1)
    heads, dim = 32, 128
    prefix, image_tokens, suffix = 35, 576, 29
    kept = 195  # DyMU-mid on LLaVA-1.5 keeps about 195 of 576 image tokens
    image_map = torch.sort(torch.cat([torch.arange(kept), torch.randint(0, kept, (image_tokens - kept,), generator=g)])).values
    pos_map = torch.cat([torch.arange(prefix), prefix + image_map, prefix + kept + torch.arange(suffix)])[None]
    nu, nf = prefix + kept + suffix, pos_map.shape[1]
    q = torch.randn(1, heads, nu, dim, generator=g).to(device)
    k = torch.randn(1, heads, nu, dim, generator=g).to(device)
    v = torch.randn(1, heads, nu, dim, generator=g).to(device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(nf).float(), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(device), emb.sin().to(device)
    pos_map = pos_map.to(device=device, dtype=torch.int32)
    print(f"VTU attention, LLaVA-1.5-like shape: Hq=Hkv={heads}, D={dim}, Nf={nf} full positions, Nu={nu} merged rows")
    ref = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend="reference")
    timings = {}
    for name in _backends_for("vtu_attention"):
        out = dk.vtu_attention(q, k, v, cos, sin, pos_map, backend=name)
        seconds = _time(lambda: dk.vtu_attention(q, k, v, cos, sin, pos_map, backend=name), repeats=3)
        timings[name] = seconds
        print(f"  {name:<10} {seconds * 1e3:8.2f} ms   out {_parity(out, ref)}")
    return timings


def main(device: str = "cpu") -> int:
    dev = torch.device(device)
    print("backends:", dk.backend_info())
    run_dtome(dev)
    run_vtu(dev)
    return 0
