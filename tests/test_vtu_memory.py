"""VTU allocates nothing of full length: every allocation of one ``dk.vtu_attention`` call, recorded
with ``torch.profiler(profile_memory=True)``, stays below a quarter of what one full-length fp32
tensor [B, Hq, Nf, D] would take, at a shape with Nf >> Nu.

The reference backend is excluded: it is the executable spec and expands to full length on
purpose. The native kernel allocates its scratch through the c10 allocator (so the profiler sees
it); its per-thread workspace (O(group * 64 * D) floats per thread) does not depend on Nf, so the
bound is checked at 2 threads and a second test checks that nothing but O(Nf) int32 grows with Nf.
"""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dymu_kernels as dk
from conftest import device_for
from dymu_kernels._backends import implements
from helpers import onto_map, rope_tables

# (B, Hq, Hkv, D, Nf, Nu): Nf >> Nu; a full-length fp32 [B, Hq, Nf, D] tensor is 2 MiB here.
SHAPE = (1, 4, 2, 64, 2048, 32)
# Half the positions for the Triton interpreter (about 1 s per head and 1024 positions).
INTERPRETER_SHAPE = (1, 2, 2, 16, 256, 8)  # small: the interpreter runs the kernel in Python (Nf >> Nu still)


def make_inputs(bsz, hq, hkv, d, nf, nu, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bsz, h, nu, d, generator=g) for h in (hq, hkv, hkv))
    cos, sin = rope_tables(nf, d)
    pos_map = onto_map(bsz, nf, nu, generator=g)
    return [t.to(device) for t in (q, k, v, cos, sin, pos_map)]


def allocations(fn, trace_path):
    """Bytes of every allocation made while ``fn()`` runs (profiler '[memory]' events > 0)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    events = json.loads(trace_path.read_text())["traceEvents"]
    return [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e["args"].get("Bytes", 0) > 0]


def check_bound(backend, tmp_path, shape=SHAPE, threads=2):
    bsz, hq, hkv, d, nf, nu = shape
    args = make_inputs(bsz, hq, hkv, d, nf, nu, device=device_for(backend))
    bound = bsz * hq * nf * d * 4 // 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(min(before, threads))
        dk.vtu_attention(*args, backend=backend)  # warm-up (compilation, lazy init)
        sizes = allocations(lambda: dk.vtu_attention(*args, backend=backend), tmp_path / "trace.json")
    finally:
        torch.set_num_threads(before)
    assert sizes, "the profiler recorded no allocation at all (the output must be one)"
    assert max(sizes) < bound, f"{backend}: one allocation of {max(sizes)} B >= {bound} B (a quarter of full length)"
    assert sum(sizes) < bound, f"{backend}: {sum(sizes)} B allocated in all (largest {sorted(sizes)[-3:]}) >= {bound} B"
    return sizes


@pytest.mark.skipif(not implements("native", "vtu_attention"), reason="native vtu_attention not built")
def test_native_allocates_nothing_of_full_length(tmp_path):
    check_bound("native", tmp_path)


@pytest.mark.skipif(not implements("native", "vtu_attention"), reason="native vtu_attention not built")
def test_native_scratch_does_not_grow_with_nf(tmp_path):
    """Four times the positions: the largest allocation (the per-thread workspace or the output)
    is unchanged, and the total grows by O(Nf) bytes (the int32 order and the validation masks),
    nowhere near Hq * D * 4 bytes per position."""
    bsz, hq, hkv, d, _, nu = SHAPE
    totals, largest = {}, {}
    for nf in (1024, 4096):
        args = make_inputs(bsz, hq, hkv, d, nf, nu)
        sizes = allocations(lambda: dk.vtu_attention(*args, backend="native"), tmp_path / f"trace{nf}.json")
        totals[nf], largest[nf] = sum(sizes), max(sizes)
    assert largest[4096] == largest[1024]
    assert totals[4096] - totals[1024] <= 64 * (4096 - 1024)


@pytest.mark.interpreter
@pytest.mark.skipif(not implements("triton", "vtu_attention"), reason="triton backend unavailable")
def test_triton_allocates_nothing_of_full_length(tmp_path):
    """Beyond the quarter bound: the output, the fp32 carry (at most Nu rows per head, so at
    most the output's size in fp32) and O(Nf) int32 are all the kernel allocates."""
    sizes = check_bound("triton", tmp_path, shape=INTERPRETER_SHAPE)
    bsz, hq, _, d, nf, nu = INTERPRETER_SHAPE
    assert sum(sizes) <= 2 * bsz * hq * nu * d * 4 + 16 * bsz * nf + 4096, sorted(sizes)


def test_triton_memory_model_below_a_quarter_of_full_length():
    """benchmarks/memory.py's model of the Triton launcher (run on a GPU only) at the LLaVA-1.5
    and LLaVA-OneVision shapes, B=16: what it allocates beyond its output stays below the quarter
    bound (the output itself nears full length when Nu nears Nf)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory

    for name, (hq, hkv, d, prefix, image, suffix, kept, batch) in memory.VTU_MEMORY_SHAPES.items():
        nf, nu = prefix + image + suffix, prefix + kept + suffix
        extra = memory.triton_model_bytes(name, batch, torch.bfloat16) - batch * hq * nu * d * 2
        assert extra < batch * hq * nf * d * 4 // 4, name
