"""Peak memory of one call, for the benchmark reports, and the VTU memory report.

``peak_bytes(fn)``: on CUDA, torch.cuda.max_memory_allocated above what was allocated before
the call. On CPU, the peak of live bytes allocated during the call through the c10 allocator,
from ``torch.profiler(profile_memory=True)``: every tensor, including the C++ kernels' scratch
(csrc allocates it with at::empty), minus what the call frees.

The VTU memory report (``python benchmarks/memory.py [--out FILE.md] [--json FILE]``): the peak
extra memory of one ``vtu_attention`` call per backend against expand + SDPA (the official fast
path, benchmarks/baselines.py) at the LLaVA-1.5 and LLaVA-OneVision shapes, in bf16. Each figure
is marked:

- ``measured``: ``peak_bytes`` of a real call on this machine (CPU here: at a reduced batch, said
  in the table, since B=16 does not fit or takes too long on a 24 GB, 2-core machine);
- ``model``: computed without running the kernel. Expand + SDPA and the reference run on meta
  tensors under a dispatch mode that tracks every op's output storage until it is freed (the
  SDPA is counted as a flash kernel: its output, not its workspace nor a math fallback's
  [B, Hq, Nf, Nf] scores; the reference's boolean mask is counted); native is
  the formula of csrc/vtu_cpu.cpp (output, int32 order/row starts, one workspace per thread).

``dymu bench`` (python_api/dymu/app/report.py) runs this and appends the table to its report.
"""

import argparse
import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that ops create while the mode is active (works on meta)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage) if t.is_meta else storage.data_ptr()
                if key in self._seen or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, key, nbytes)
        return out


def _profiled_peak(fn) -> int:
    """Peak of (bytes allocated - bytes freed) during ``fn()``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    live = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if event["args"].get("Device Type", 0) != 0:  # CPU only
            continue
        live += event["args"].get("Bytes", 0)
        peak = max(peak, live)
    return peak


def peak_bytes(fn) -> int:
    """Peak bytes allocated while running ``fn()`` (see the module docstring)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _profiled_peak(fn)


def _flash_sdpa_stand_in(query, key, value, *args, **kwargs):
    """What a flash SDPA allocates: its output (its per-thread/per-block workspace is left out)."""
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def meta_peak_bytes(fn) -> int:
    """Peak live bytes of the tensors ``fn()`` creates, for a function of meta tensors (a model).
    SDPA is counted as a flash kernel (its output only): on meta it would take the math path and
    materialise the scores, which the fast path on a GPU or a CPU does not."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa_stand_in
    try:
        with _LiveBytes() as mode:
            fn()
    finally:
        F.scaled_dot_product_attention = sdpa
    return mode.peak


# --------------------------------------------------------------------------------------------
# The VTU memory report

# name: (Hq, Hkv, D, text_prefix, image_positions, text_suffix, image_rows_kept, batch of the model)
VTU_MEMORY_SHAPES = {
    "LLaVA-1.5-7B 89 rows": (32, 32, 128, 35, 576, 29, 89, 16),
    "LLaVA-1.5-7B 195 rows": (32, 32, 128, 35, 576, 29, 195, 16),
    "LLaVA-1.5-7B 394 rows": (32, 32, 128, 35, 576, 29, 394, 16),
    "LLaVA-OV-Qwen2-7B 15%": (28, 4, 128, 60, 7190, 40, 1078, 16),
    "LLaVA-OV-Qwen2-7B 30%": (28, 4, 128, 60, 7190, 40, 2157, 16),
    "LLaVA-OV-Qwen2-7B 60%": (28, 4, 128, 60, 7190, 40, 4314, 16),
}
# Batch measured on CPU per shape (None: model only); the reference at OneVision's Nf = 7290
# materialises 28 * 7290^2 fp32 scores per image (5.9 GB) and takes minutes on 2 cores.
CPU_MEASURED_BATCH = {"LLaVA-1.5": {"fast-path": 1, "reference": 1, "native": 1},
                      "LLaVA-OV": {"fast-path": 1, "reference": None, "native": 1}}
NATIVE_BLOCK = 64  # csrc/vtu_cpu.cpp kBlockQ == kBlockK
NATIVE_MODEL_THREADS = 16


def _vtu_inputs(name: str, batch: int, dtype, device):
    hq, hkv, d, prefix, image, suffix, kept, _ = VTU_MEMORY_SHAPES[name]
    g = torch.Generator().manual_seed(0)
    groups = torch.sort(torch.cat([torch.arange(kept), torch.randint(0, kept, (image - kept,), generator=g)])).values
    pos_map = torch.cat([torch.arange(prefix), prefix + groups, prefix + kept + torch.arange(suffix)])[None]
    nu, nf = prefix + kept + suffix, pos_map.shape[1]
    pos_map = pos_map.expand(batch, nf).to(torch.int32)
    if device == "meta":
        q, k, v = (torch.empty(batch, h, nu, d, dtype=dtype, device="meta") for h in (hq, hkv, hkv))
        cos = sin = torch.empty(nf, d, dtype=dtype, device="meta")
        return q, k, v, cos, sin, pos_map.to("meta")
    q, k, v = (torch.randn(batch, h, nu, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(nf).float(), inv_freq).repeat(1, 2)
    return q, k, v, emb.cos().to(device, dtype), emb.sin().to(device, dtype), pos_map.to(device)


def _call(impl: str, args):
    import dymu_kernels as dk
    from baselines import fast_path_vtu_attention

    if impl == "fast-path":
        return fast_path_vtu_attention(*args)
    return dk.vtu_attention(*args, backend=impl)


def native_model_bytes(name: str, batch: int, dtype, threads: int = NATIVE_MODEL_THREADS) -> int:
    """csrc/vtu_cpu.cpp's allocations: the output, int32 order [B, Nf] and row starts
    [B, Nu + 1], one fp32 workspace per thread (the validation masks in api.py are left out)."""
    hq, hkv, d, prefix, image, suffix, kept, _ = VTU_MEMORY_SHAPES[name]
    nu, nf, group, dp = prefix + kept + suffix, prefix + image + suffix, hq // hkv, -(-d // 16) * 16
    block = NATIVE_BLOCK
    workspace = 2 * group * block * dp + 2 * block * dp + 4 * block + 2 * group * block + group * dp + 4 * dp
    element = torch.empty(0, dtype=dtype).element_size()
    return batch * hq * nu * d * element + 4 * batch * (nf + nu + 1) + 4 * threads * workspace


def triton_model_bytes(name: str, batch: int, dtype, capability=(9, 0)) -> int:
    """dymu_kernels/vtu/triton.py's allocations on a GPU of this capability: the output, int32
    order [B, Nf] and row start/count 2 x [B, Nu], and the fp32 carry of rows open at a step's
    end, [B, Hq, min(Nu, cdiv(Nf, BLOCK_S)), D] (the validation masks in api.py are left out)."""
    from dymu_kernels.vtu.triton import attention_config, group_heads

    hq, hkv, d, prefix, image, suffix, kept, _ = VTU_MEMORY_SHAPES[name]
    nu, nf = prefix + kept + suffix, prefix + image + suffix
    block_m = attention_config(d, dtype, capability=capability)["BLOCK_M"]
    block_s = block_m // group_heads(hq // hkv, block_m)
    element = torch.empty(0, dtype=dtype).element_size()
    carry = batch * hq * min(nu, -(-nf // block_s)) * d * 4
    return batch * hq * nu * d * element + 4 * batch * (nf + 2 * nu) + carry


def model_bytes(name: str, impl: str, batch: int, dtype=torch.bfloat16):
    """Modelled peak extra bytes of one call (see the module docstring), or None."""
    if impl == "native":
        return native_model_bytes(name, batch, dtype)
    if impl == "triton":
        return triton_model_bytes(name, batch, dtype)
    args = _vtu_inputs(name, batch, dtype, "meta")
    if impl == "fast-path":
        return meta_peak_bytes(lambda: _call(impl, args))
    if impl == "reference":  # its module function: through dk the custom op's fake shows the output only
        from dymu_kernels.vtu import reference

        q, k, v, cos, sin, pos_map = args
        full = torch.full((batch,), pos_map.shape[1], dtype=torch.int32, device="meta")
        rope = [t.expand(batch, *t.shape) for t in (cos, sin)]
        return meta_peak_bytes(lambda: reference.vtu_attention(q, k, v, *rope, pos_map.to(torch.int32), full, True,
                                                               q.shape[-1] ** -0.5))
    return None


def vtu_memory_rows(measure: bool = True, dtype=torch.bfloat16, impls=("fast-path", "reference", "native", "triton")):
    """One dict per (shape, impl): {"shape", "impl", "batch", "bytes", "kind", "full_bytes",
    "vs_fast_path"} with kind "measured" or "model"; vs_fast_path compares like with like
    (same batch and kind). Measured on CPU unless CUDA is present."""
    rows = []
    for name, spec in VTU_MEMORY_SHAPES.items():
        hq, hkv, d, prefix, image, suffix, kept, model_batch = spec
        family = "LLaVA-OV" if name.startswith("LLaVA-OV") else "LLaVA-1.5"
        nf = prefix + image + suffix
        entries = []
        for impl in impls:
            batch = CPU_MEASURED_BATCH[family].get(impl) if measure else None
            if impl == "triton":  # measured on a GPU only (the interpreter is far too slow here)
                batch = 1 if measure and torch.cuda.is_available() else None
            if batch is not None:
                args = _vtu_inputs(name, batch, dtype, "cuda" if torch.cuda.is_available() else "cpu")
                _call(impl, args)  # warm-up
                entries.append((impl, batch, peak_bytes(lambda: _call(impl, args)), "measured"))
                del args
            entries.append((impl, model_batch, model_bytes(name, impl, model_batch, dtype), "model"))
        base = {(batch, kind): nbytes for impl, batch, nbytes, kind in entries if impl == "fast-path"}
        for impl, batch, nbytes, kind in entries:
            ref = base.get((batch, kind))
            rows.append({"shape": f"{name} (Nf={nf}, Nu={prefix + kept + suffix})", "impl": impl, "batch": batch,
                         "bytes": nbytes, "kind": kind, "full_bytes": batch * hq * nf * d * 4,
                         "vs_fast_path": (nbytes / ref) if ref and nbytes is not None else None})
    return rows


def render_vtu_memory(rows, device: str) -> str:
    """Markdown section for the benchmark report."""
    def mib(n):
        return "–" if n is None else f"{n / 2**20:,.1f} MiB"

    lines = ["## vtu_attention: peak extra memory per call", "",
             f"bf16 inputs; bytes allocated during one call beyond its inputs (output included). `measured`: on {device} "
             "at the batch shown (reduced from 16 to fit this machine); `model`: computed (benchmarks/memory.py: expand + "
             f"SDPA and the reference traced on meta tensors; native by its formula with {NATIVE_MODEL_THREADS} thread "
             "workspaces; triton by its formula at the sm_90 tiles). `x fast path`: against expand + SDPA at the same batch and kind. `full fp32`: one "
             "[B, Hq, Nf, D] fp32 tensor, for scale.", "",
             "| shape | impl | B | kind | peak extra | x fast path | full fp32 |", "|---|---|---:|---|---:|---:|---:|"]
    for row in rows:
        ratio = "–" if row["vs_fast_path"] is None else f"{row['vs_fast_path']:.3g}x"
        lines.append(f"| {row['shape']} | {row['impl']} | {row['batch']} | {row['kind']} | {mib(row['bytes'])} | "
                     f"{ratio} | {mib(row['full_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="VTU peak extra memory per backend vs expand + SDPA")
    parser.add_argument("--out", help="write the markdown section here (default: print it)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--model-only", action="store_true", help="compute the model figures only (no kernels run)")
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = vtu_memory_rows(measure=not opts.model_only)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    text = render_vtu_memory(rows, device)
    if opts.out:
        Path(opts.out).write_text(text)
    else:
        print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
