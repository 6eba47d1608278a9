"""Roofline model of every benchmarked kernel: ideal HBM bytes, FLOPs, the bytes the kernels'
own tiling moves, and the time a GPU's roofline allows. A model, not a measurement.

    python benchmarks/roofline.py              # the "model, not measured" table (markdown)
    python benchmarks/roofline.py --json FILE  # measured medians of a benchmark run beside it

Definitions (per call):
- ideal bytes: every input read once and every output written once (HBM), nothing else.
- kernel bytes: what the kernels' tiling reads and writes through L2 with the block sizes the
  launchers pick (tiles re-read per destination / query tile, scratch written and re-read);
  on a GPU most re-reads hit L2, so HBM traffic lies between the two figures.
- FLOPs: multiply-adds count 2. DToMe's scores are IEEE fp32 dots (FMA units, not tensor
  cores), so its compute roof is the fp32 non-tensor peak; VTU's dots run on the tensor cores
  in bf16/fp16 (the 989 / 312 TFLOP/s roofs).
- roofline time = max(bytes / bandwidth, FLOPs / peak) with the ideal bytes; a measured time
  reads as ``roofline / measured`` (1.0 = at the roofline).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

# name: (HBM bytes/s, dense bf16 tensor FLOP/s, fp32 non-tensor FLOP/s)
GPUS = {
    "H100": (3.35e12, 989e12, 67e12),
    "H200": (4.8e12, 989e12, 67e12),
    "A100": (2.0e12, 312e12, 19.5e12),
}

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Cost:
    """One kernel call's cost model."""

    ideal_bytes: float
    flops: float
    kernel_bytes: float
    tensor_cores: bool  # whether the FLOPs run on tensor cores (else fp32 FMA units)

    def roofline_s(self, gpu: str) -> float:
        bandwidth, tensor_peak, fp32_peak = GPUS[gpu]
        return max(self.ideal_bytes / bandwidth, self.flops / (tensor_peak if self.tensor_cores else fp32_peak))

    def bound(self, gpu: str) -> str:
        bandwidth, tensor_peak, fp32_peak = GPUS[gpu]
        compute = self.flops / (tensor_peak if self.tensor_cores else fp32_peak)
        return "memory" if self.ideal_bytes / bandwidth >= compute else "compute"

    def as_dict(self) -> dict:
        return {"ideal_bytes": self.ideal_bytes, "flops": self.flops, "kernel_bytes": self.kernel_bytes,
                "tensor_cores": self.tensor_cores}


# --------------------------------------------------------------------------------------------- DToMe


def dtome_merge_cost(batch: int, n: int, c: int, d: int, dtype: str = "fp16", n0: int | None = None,
                     metric_dtype: str | None = None) -> Cost:
    """One fused DToMe step (``dk.dtome_merge`` with pos_map over N0 = N original positions).

    Ideal: read metric, x, size, lengths, pos_map; write x', size', lengths', pos_map', row_map.
    Kernel tiling (dymu_kernels/dtome/triton.py configs): the similarity kernel re-reads each
    source tile per destination tile and each destination tile once per source tile (and once
    more for its norm), plus the split scratch; selection reads node_max twice; the grouping
    kernel reads the row_map once per block of rows; the merge reads every row once.
    """
    e = DTYPE_BYTES[dtype]
    em = DTYPE_BYTES[metric_dtype or dtype]
    n0 = n if n0 is None else n0
    num_src, num_dst = (n + 1) // 2, n // 2
    ideal = batch * (n * c * em + 2 * n * d * e + n * 4 * 2 + 4 * 2 + n0 * 4 * 2 + n * 4)
    # scores (2 flops per multiply-add), normalisation (square, sum, divide: ~3 per element),
    # the weighted merge (multiply-add per source element) and the mean (one divide per element)
    flops = batch * (2.0 * num_src * num_dst * c + 3.0 * n * c + 2.0 * n * d + n * d)

    from_cfg = _dtome_tiles(n, c, d, batch, metric_dtype or dtype)
    block_a, block_b, splits, block_i = from_cfg
    tiles_a = _cdiv(num_src, block_a)
    dst_per_split = _cdiv(num_dst, splits)
    dst_tiles_per_split = max(1, _cdiv(dst_per_split, block_b))
    sim = batch * tiles_a * splits * (
        block_a * c * em * (1 + dst_tiles_per_split)  # norm pass + one re-read per destination tile
        + 2 * dst_per_split * c * em  # norm pass + dot pass over the split's destinations
    )
    sim += batch * num_src * 8 * (2 * splits if splits > 1 else 1)  # outputs (+ scratch written and read)
    select = batch * (num_src * 8 * 2 + n * 4 + 8)
    group = batch * (_cdiv(n, block_i) * n * 4 + n * 4 * 4)
    merge = batch * (n * d * e * 2 + n * 4 * 4 + n * 4 + n0 * 4 * 3)
    return Cost(ideal, flops, sim + select + group + merge, tensor_cores=False)


def _dtome_tiles(n: int, c: int, d: int, batch: int, dtype: str):
    """(BLOCK_A, BLOCK_B, splits, BLOCK_I) as the DToMe Triton launchers pick them."""
    try:  # the launchers' own choice when the package is importable
        import torch

        from dymu_kernels.dtome import triton as tb

        tdtype = {2: torch.float16, 4: torch.float32}[DTYPE_BYTES[dtype]]
        cfg = tb._similarity_config(n, c, batch, tdtype)
        return cfg["BLOCK_A"], cfg["BLOCK_B"], cfg["splits"], tb._group_config(n)["BLOCK_I"]
    except Exception:  # noqa: BLE001 - fall back to the documented defaults
        return 32 if DTYPE_BYTES[dtype] == 2 else 16, 64 if DTYPE_BYTES[dtype] == 2 else 32, 1, 64


# --------------------------------------------------------------------------------------------- packed varlen


def _sum_costs(costs) -> Cost:
    costs = list(costs)
    return Cost(sum(c.ideal_bytes for c in costs), sum(c.flops for c in costs), sum(c.kernel_bytes for c in costs),
                tensor_cores=costs[0].tensor_cores)


def dtome_merge_varlen_cost(lengths, n0: int, c: int, d: int, dtype: str = "fp32", padded: bool = False,
                            metric_dtype: str | None = None) -> Cost:
    """One DToMe step on images of ``lengths`` rows (each standing for n0 original positions).

    Packed (``dk.dtome_merge_varlen``): the sum over images of ``dtome_merge_cost`` with B = 1,
    N = the image's length. ``padded=True``: what the path through padding moves and computes:
    ``dtome_merge_cost`` on [B, max(lengths)], plus the gather of the packed x / metric / size
    rows into the padded batch (read T rows, write B * max rows) and the scatter of the merged
    x / size back (read B * max rows, write T) with its pos_map shift (read and write B * n0).
    """
    lengths = [int(t) for t in lengths]
    if not padded:
        return _sum_costs(dtome_merge_cost(1, t, c, d, dtype, n0=n0, metric_dtype=metric_dtype) for t in lengths)
    batch, longest, total = len(lengths), max(lengths), sum(lengths)
    e, em = DTYPE_BYTES[dtype], DTYPE_BYTES[metric_dtype or dtype]
    merge = dtome_merge_cost(batch, longest, c, d, dtype, n0=n0, metric_dtype=metric_dtype)
    moved = (total + batch * longest) * (d * e + c * em + 4) + (batch * longest + total) * (d * e + 4) + batch * n0 * 4 * 2
    return Cost(merge.ideal_bytes + moved, merge.flops, merge.kernel_bytes + moved, tensor_cores=False)


def varlen_attention_cost(lengths, heads: int, dim: int, dtype: str = "bf16", padded: bool = False,
                          block_m: int = 128) -> Cost:
    """One proportional (log-size biased) attention call over images of ``lengths`` rows.

    Ideal: read q, k, v and the sizes of every row, write the output. FLOPs: QK^T and PV,
    2 * 2 * t^2 * dim per head and image (the softmax's few per score are left out).
    ``padded=True``: the same on [B, max(lengths)] with the [B, 1, 1, max] float mask, every
    image paying for the longest. Kernel bytes: FlashAttention style, K and V re-read once per
    query tile of ``block_m`` rows (a model, not the native kernel's exact tiling).
    """
    lengths = [int(t) for t in lengths]
    if padded:
        lengths, mask = [max(lengths)] * len(lengths), DTYPE_BYTES[dtype]
    else:
        mask = 4  # the fp32 size per row
    e = DTYPE_BYTES[dtype]
    ideal = sum(t * (4 * heads * dim * e + mask) for t in lengths)
    flops = sum(4.0 * t * t * dim * heads for t in lengths)
    kernel = sum(t * (2 * heads * dim * e + mask) + _cdiv(t, block_m) * t * (2 * heads * dim * e + mask)
                 for t in lengths)
    return Cost(ideal, flops, kernel, tensor_cores=dtype != "fp32")


# --------------------------------------------------------------------------------------------- VTU


def vtu_attention_cost(batch: int, hq: int, hkv: int, d: int, nf: int, nu: int, dtype: str = "bf16",
                       rope_dtype: str | None = None, block_m: int = 128, block_n: int = 64,
                       kv_per_query_head: bool = False) -> Cost:
    """One VTU attention call (``dk.vtu_attention``, causal) over Nf full positions, Nu merged rows.

    Ideal: read merged Q (Hq heads), K, V (Hkv heads), cos/sin for Nf positions, the map; write
    the merged output. FLOPs: causal full-length attention, 2 * 2 * Nf^2 * D * Hq / 2 per image
    (the score work stays Nf^2 whatever Nu is), plus RoPE. Kernel tiling: FlashAttention-2 style
    with query tiles of ``block_m`` positions; per query tile the gathered K/V rows and the keys'
    cos/sin of the causal prefix are read, once per KV head serving its GQA group (or once per
    query head with ``kv_per_query_head``, the layout of a kernel that does not share the group).
    """
    e = DTYPE_BYTES[dtype]
    er = DTYPE_BYTES[rope_dtype or dtype]
    ideal = batch * (hq * nu * d * e + 2 * hkv * nu * d * e + 2 * nf * d * er + nf * 4 + hq * nu * d * e)
    flops = batch * (2.0 * 2.0 * nf * nf * d * hq / 2 + 6.0 * nf * d * (hq + hkv))
    q_tiles = _cdiv(nf, block_m)
    # keys visited by query tile t under the causal mask: (t + 1) * block_m, in block_n steps
    keys = sum(min(nf, _cdiv((t + 1) * block_m, block_n) * block_n) for t in range(q_tiles))
    readers = hq if kv_per_query_head else hkv
    kv = readers * keys * (2 * d * e + 2 * d * er + 4)  # K, V rows + cos/sin + map per key
    q = hq * nf * (d * e + 2 * d * er + 4)  # queries gathered per position, rotated
    out = hq * nu * d * e + hq * nu * d * 4 * 2  # output + the fp32 carry of open rows (written and read, bound)
    return Cost(ideal, flops, batch * (kv + q + out), tensor_cores=dtype != "fp32")


# --------------------------------------------------------------------------------------------- shapes

# Shapes of the benchmark suites (benchmarks/test_bench_*.py) and of the models in the report.
DTOME_SHAPES = {"CLIP-L/14-336": (577, 64, 1024), "SigLIP-SO400M": (729, 72, 1152)}
VTU_SHAPES = {  # name: (Hq, Hkv, D, Nf, Nu)
    "SmolLM2-135M Nu=140": (9, 3, 64, 640, 140),
    "LLaVA-1.5-7B Nu=130": (32, 32, 128, 640, 130),
    "LLaVA-1.5-7B Nu=240": (32, 32, 128, 640, 240),
    "LLaVA-1.5-7B Nu=430": (32, 32, 128, 640, 430),
    "LLaVA-OV-Qwen2-7B Nf=3.7k": (28, 4, 128, 3700, 1180),
    "LLaVA-OV-Qwen2-7B Nf=9.5k": (28, 4, 128, 9500, 2920),
}

# The "model, not measured" table: one DToMe step of each encoder and one VTU layer of each LLM.
MODEL_ROWS = [
    ("LLaVA-1.5 (CLIP-L/14-336) DToMe step, B=1", "dtome", dict(batch=1, n=577, c=64, d=1024, dtype="fp16")),
    ("LLaVA-1.5 (CLIP-L/14-336) DToMe step, B=64", "dtome", dict(batch=64, n=577, c=64, d=1024, dtype="fp16")),
    ("LLaVA-1.5-7B VTU layer, Nf=640 Nu=240, B=1", "vtu", dict(batch=1, hq=32, hkv=32, d=128, nf=640, nu=240)),
    ("LLaVA-1.5-7B VTU layer, Nf=640 Nu=240, B=16", "vtu", dict(batch=16, hq=32, hkv=32, d=128, nf=640, nu=240)),
    ("LLaVA-OV (SigLIP-SO400M) DToMe step, B=10 crops", "dtome", dict(batch=10, n=729, c=72, d=1152, dtype="bf16")),
    ("LLaVA-OV-Qwen2-7B VTU layer, Nf=7290 Nu=2200, B=1", "vtu", dict(batch=1, hq=28, hkv=4, d=128, nf=7290, nu=2200)),
    ("LLaVA-OV-Qwen2-7B VTU layer, Nf=7290 Nu=2200, B=16", "vtu", dict(batch=16, hq=28, hkv=4, d=128, nf=7290, nu=2200)),
]


def cost_of(kind: str, **shape) -> Cost:
    return dtome_merge_cost(**shape) if kind == "dtome" else vtu_attention_cost(**shape)


def bench_cost(op: str, shape_label: str, batch: int = 1, dtype: str = "fp32") -> Cost | None:
    """The cost of one benchmark of the suites, from its op and shape name (None if unknown)."""
    if op == "dtome_merge":
        for name, (n, c, d) in DTOME_SHAPES.items():
            if shape_label.startswith(name):
                return dtome_merge_cost(batch, n, c, d, dtype)
    if op == "vtu_attention":
        for name, (hq, hkv, d, nf, nu) in VTU_SHAPES.items():
            if shape_label.startswith(name):
                return vtu_attention_cost(batch, hq, hkv, d, nf, nu, dtype)
    return None


# --------------------------------------------------------------------------------------------- output


def _fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.3g} MB"


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def model_table(gpus=("H100", "H200", "A100")) -> str:
    """Markdown: the roofline model for the LLaVA-1.5 and LLaVA-OneVision shapes (not measured)."""
    head = ["shape", "ideal bytes", "kernel bytes", "GFLOP"] + [f"{g} roofline" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, kind, shape in MODEL_ROWS:
        cost = cost_of(kind, **shape)
        cells = [label, _fmt_bytes(cost.ideal_bytes), _fmt_bytes(cost.kernel_bytes), f"{cost.flops / 1e9:.3g}"]
        cells += [f"{_fmt_time(cost.roofline_s(g))} ({cost.bound(g)})" for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    bw = ", ".join(f"{g} {GPUS[g][0] / 1e12:g} TB/s, {GPUS[g][1] / 1e12:g} TFLOP/s bf16, "
                   f"{GPUS[g][2] / 1e12:g} TFLOP/s fp32" for g in gpus)
    notes = [
        "",
        f"Model, not measured ({bw}). Roofline = max(ideal bytes / bandwidth, FLOPs / peak); DToMe's "
        "scores are IEEE fp32 (FMA-unit peak), VTU's dots bf16 on tensor cores. Kernel bytes: what the "
        "kernels' tiling moves through L2 (re-read tiles, scratch); HBM traffic lies between the two "
        "byte figures. A VTU layer is one attention call (all heads); a DToMe step one merge of one "
        "encoder block. Generated by `python benchmarks/roofline.py`.",
    ]
    return "\n".join(lines + notes)


def gpu_of(name: str | None) -> str | None:
    """The GPUS key of a device name ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    for key in GPUS:
        if name and key in name.upper():
            return key
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="a pytest-benchmark JSON file: print measured medians beside the model")
    args = parser.parse_args(argv)
    print(model_table())
    if args.json:
        data = json.load(open(args.json))
        name = ((data.get("machine_info") or {}).get("dymu") or {}).get("gpu")
        if name is None:  # a plain pytest-benchmark file: the GPU of this machine, if any
            try:
                import torch

                name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            except Exception:  # noqa: BLE001
                name = None
        gpu = gpu_of(name)
        print()
        print("| benchmark | median | ideal bytes | kernel bytes | GFLOP | roofline | fraction |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for bench in data.get("benchmarks", []):
            roof = (bench.get("extra_info") or {}).get("roofline")
            if not roof:
                continue
            cost = Cost(**roof)
            median = bench["stats"]["median"]
            line = f"| {bench['name']} | {_fmt_time(median)} | {_fmt_bytes(cost.ideal_bytes)} | " \
                   f"{_fmt_bytes(cost.kernel_bytes)} | {cost.flops / 1e9:.3g} | "
            if gpu:
                roof_s = cost.roofline_s(gpu)
                line += f"{_fmt_time(roof_s)} | {100 * roof_s / median:.3g}% |"
            else:
                line += "– | – |"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
