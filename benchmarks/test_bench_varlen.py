"""Packed variable-length DToMe (issue 12): attention, merge step and encoder, as ratios in one run.

1. ``proportional_attention_varlen`` per backend against what the padded encoder runs: SDPA on
   the batch padded to its longest image with the float log-size mask [B, 1, 1, N] (-inf on
   padding). Shapes: CLIP ViT-L/14-336 (N=577, 16 heads of 64) and SigLIP SO400M (N=729, 16 heads
   of 72). Lengths per image spread evenly over [0.35 N, N] (the spread of kept fractions that
   the shipped mid thresholds give on the demo photos is about 0.4-1.0), sizes summing to N.
   B = 8 and 64 on a GPU; on a CPU B = 64 only with DYMU_BENCH_LARGE=1 in the environment
   (masked SDPA takes seconds per call there; CI runs B = 8 only).
2. ``dtome_merge_varlen`` per backend against what a user of the padded op runs on a packed batch
   (``merge_through_padding``: pad to [B, longest, D], ``dtome_merge`` with lengths, pack back into
   the capacity T, with the same backend; ``padded-op-only`` times its ``dtome_merge`` alone, on
   the batch padded beforehand, to show how much of the gap is the copies). Shapes:
   CLIP-L/14-336 (N=577, C=64, D=1024, CLS kept) and SigLIP-SO400M (N=729, C=72, D=1152),
   lengths and sizes as for the attention, a per-image threshold letting 21 sources of each
   image merge. Per backend the three paths run once per round, interleaved (as the encoder
   cases below), and their results are checked to agree image by image (lengths, sizes, pos_map
   exactly; x within tolerance), so without --benchmark-enable this is also a correctness smoke test.
3. ``DToMeEncoder`` on the 13 demo photos (DINOv2-S/14, 224 px) per shipped setting: packed,
   padded, the unmerged loop (every threshold +inf) and the stock HF model, plus the FLOP-ideal
   speedup over the unmerged loop from the per-block lengths (q/k/v/out projections and
   attention on the rows entering the block, MLP on the rows after its merge).
   All cases run once per round, interleaved (a shared machine's load then hits them alike); on a
   CPU the clock is the process CPU time of one thread (robust against other processes' load);
   ``test_encoder_summary`` prints best-of-rounds times and the per-round median ratios and
   writes them, with the attention ratios (best of rounds of each case) and the merge ratios
   (per-round medians), the roofline model of benchmarks/roofline.py beside them, to
   ``results/varlen_encoder_<device>.{json,md}``.

Environment: DYMU_BENCH_LARGE=1 adds B = 64 to the attention and merge cases on a CPU (see
benchmarks/harness.py; always on with a GPU). A full CPU run of this file with it takes a few minutes.
"""

import functools
import json
import math
import os

import pytest
import torch

from dymu.app.encoder_cost import flop_ideal_speedup

import dymu_kernels as dk
from harness import BENCH_LARGE, DEVICE, kernel_backends, median_ratio, sync, time_best, time_interleaved
from roofline import DTOME_SHAPES, dtome_merge_cost, dtome_merge_varlen_cost, gpu_of, varlen_attention_cost

ATTN_SHAPES = {"CLIP-L/14-336": (577, 16, 64), "SigLIP-SO400M": (729, 16, 72)}
BATCHES = (8, 64) if BENCH_LARGE else (8,)
ATTN_IMPLS = ["sdpa-masked-padded"] + [b for b in kernel_backends("proportional_attention_varlen") if b != "reference"]
SETTINGS = ("low", "mid", "high")
_MEDIANS = {}
_COSTS = {}  # (kind, "<shape> B=<batch>", path) -> roofline.Cost of the cases that ran


def spread_lengths(n: int, batch: int, g: torch.Generator):
    """Lengths spread evenly over [0.35 n, n] in random order, and per image t sizes >= 1 summing
    to n (t rows standing for n patches). Returns (lengths [B] int64, list of [t] float sizes)."""
    lengths = torch.linspace(0.35 * n, n, batch).round().long()
    lengths = lengths[torch.randperm(batch, generator=g)]
    sizes = []
    for t in lengths.tolist():
        s = torch.ones(t)
        s.index_add_(0, torch.randint(0, t, (n - t,), generator=g), torch.ones(n - t))
        sizes.append(s)
    return lengths, sizes


def attention_inputs(shape: str, batch: int, dtype):
    n, heads, dim = ATTN_SHAPES[shape]
    g = torch.Generator().manual_seed(batch)
    lengths, sizes = spread_lengths(n, batch, g)
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(DEVICE, dtype) for _ in range(3))
    size = torch.cat(sizes).to(DEVICE)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    longest = int(lengths.max())
    # the padded batch of the old path
    rows = cu[:-1, None].long() + torch.arange(longest, device=DEVICE)
    valid = rows < cu[1:, None]
    rows = rows.clamp_max(total - 1)
    pad = [t[rows].transpose(1, 2).contiguous() for t in (q, k, v)]  # [B, H, Nmax, D]
    bias = torch.where(valid, size[rows].log(), float("-inf"))[:, None, None, :].to(dtype)
    return (q, k, v, size, cu, longest), (pad, bias)


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_attention_varlen(benchmark, shape, batch, impl):
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    (q, k, v, size, cu, longest), (pad, bias) = attention_inputs(shape, batch, dtype)
    if impl == "sdpa-masked-padded":
        def run():
            out = torch.nn.functional.scaled_dot_product_attention(*pad, attn_mask=bias)
            sync()
            return out
    else:
        def run():
            out = dk.proportional_attention_varlen(q, k, v, size, cu, max_seqlen=longest, backend=impl)
            sync()
            return out
    cost = varlen_attention_cost((cu[1:] - cu[:-1]).tolist(), q.shape[1], q.shape[2],
                                 "fp32" if dtype == torch.float32 else "bf16", padded=impl == "sdpa-masked-padded")
    _COSTS[("attn", f"{shape} B={batch}", "sdpa-masked-padded" if impl == "sdpa-masked-padded" else "packed")] = cost
    benchmark.group = f"proportional_attention_varlen {shape} B={batch}"
    benchmark.extra_info.update(impl=impl, op="proportional_attention_varlen", shape=f"{shape} B={batch}",
                                device=str(DEVICE), dtype=str(dtype), rows=int(cu[-1]), padded_rows=batch * longest,
                                roofline=cost.as_dict())
    best = time_best(benchmark, run)  # on a CPU: process CPU time of one thread, as for the encoder
    if best is not None:
        _MEDIANS[("attn", shape, batch, impl)] = best


# ------------------------------------------------------------------ one merge step, packed vs padded

# name: (N, C, D, protect_first): the DToMe benchmark's shapes (CLIP keeps its CLS token)
MERGE_SHAPES = {name: (n, c, d, name.startswith("CLIP")) for name, (n, c, d) in DTOME_SHAPES.items()}
MERGE_BACKENDS = [b for b in kernel_backends("dtome_merge_varlen") if b in kernel_backends("dtome_merge")]
MERGES_PER_IMAGE = 21  # each image's threshold lets about this many of its sources merge


@functools.lru_cache(maxsize=None)  # every backend and path of a shape reads the same batch (read only)
def merge_inputs(shape: str, batch: int, dtype):
    """A packed batch after some merges: lengths and sizes as for the attention, metric rows drawn
    around 40-200 centres per image (so similar rows exist), pos_map [B, N] original position ->
    packed row (size[r] positions per row r), and a [B] threshold calibrated per image so that
    MERGES_PER_IMAGE of its sources merge."""
    n, c, d, cls = MERGE_SHAPES[shape]
    g = torch.Generator().manual_seed(batch)
    lengths, sizes = spread_lengths(n, batch, g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    metric = torch.cat([torch.randn(int(k), c, generator=g)[torch.randint(0, int(k), (int(t),), generator=g)]
                        for k, t in zip(torch.randint(40, 200, (batch,), generator=g), lengths)])
    metric = metric + 0.35 * torch.randn(metric.shape, generator=g)
    x = torch.randn(int(cu[-1]), d, generator=g)
    pos_map = torch.stack([torch.repeat_interleave(torch.arange(int(t)) + cu[b], sizes[b].long())
                           for b, t in enumerate(lengths)])
    longest = int(lengths.max())
    rows = (cu[:-1, None] + torch.arange(longest)).clamp_max(int(cu[-1]) - 1)
    node_max, _ = dk.bipartite_similarity(metric[rows], lengths, protect_first=cls, backend="reference")
    # per image: midway between its r-th and (r+1)-th best score (batch_threshold's value, the
    # (r+1)-th itself, sits on a score, where a backend's last-bit rounding decides one merge more)
    top = node_max.topk(MERGES_PER_IMAGE + 1, dim=1).values
    tau = (top[:, -2] + top[:, -1]) / 2
    return dict(x=x.to(DEVICE, dtype), metric=metric.to(DEVICE, dtype), size=torch.cat(sizes).to(DEVICE),
                cu_seqlens=cu.to(torch.int32).to(DEVICE), threshold=tau.to(DEVICE),
                pos_map=pos_map.to(torch.int32).to(DEVICE), protect_first=cls), longest


def pad_packed(x, metric, size, cu_seqlens, pos_map, longest: int):
    """The packed rows as the padded op takes them: x, metric, size [B, longest, *], lengths [B],
    pos_map shifted to rows within each image (no host sync)."""
    starts = cu_seqlens[:-1, None].long()
    rows = (starts + torch.arange(longest, device=x.device)).clamp_max(x.shape[0] - 1)  # padding reads some real row
    return (x[rows], metric[rows], size[rows], cu_seqlens[1:] - cu_seqlens[:-1],
            torch.where(pos_map >= 0, pos_map - starts, -1).to(torch.int32))


def pack_merged(res, total: int):
    """A padded ``dtome_merge`` result packed back into the capacity T as ``dtome_merge_varlen``
    returns it (rows past the new total zero; no host sync). Returns (x [T, D], size [T],
    cu_seqlens [B + 1] int32, pos_map [B, N0] packed rows)."""
    longest = res.x.shape[1]
    offsets = torch.arange(longest, device=res.x.device)
    new_cu = torch.cat([res.lengths.new_zeros(1), res.lengths.cumsum(0).to(torch.int32)])
    kept = offsets < res.lengths[:, None]
    dest = torch.where(kept, new_cu[:-1, None] + offsets, total).flatten()  # dropped rows land on spare row T
    out_x = res.x.new_zeros(total + 1, res.x.shape[2]).index_copy_(0, dest, res.x.flatten(0, 1))[:total]
    out_size = res.size.new_zeros(total + 1).index_copy_(0, dest, res.size.flatten())[:total]
    out_pos = torch.where(res.pos_map >= 0, res.pos_map + new_cu[:-1, None], -1)
    return out_x, out_size, new_cu, out_pos


def merge_through_padding(x, metric, size, cu_seqlens, threshold, *, pos_map, protect_first, longest, backend):
    """The baseline: what a user of the padded op runs on a packed batch. Pad the rows to
    [B, longest, *], merge with ``dk.dtome_merge`` (lengths), and pack the merged rows back."""
    xp, mp, sp, lengths, pos_padded = pad_packed(x, metric, size, cu_seqlens, pos_map, longest)
    res = dk.dtome_merge(xp, mp, sp, lengths, threshold, pos_map=pos_padded, protect_first=protect_first,
                         backend=backend)
    return pack_merged(res, x.shape[0])


def assert_same_merge(packed, padded, dtype):
    """The packed op's result equals the path through padding, image by image: lengths, sizes and
    pos_map exactly, x within the dtype's tolerance (one vectorised test; a failure names the
    first image that differs)."""
    x, size, cu, pos_map = padded
    assert torch.equal(packed.cu_seqlens, cu), ("new lengths differ", packed.cu_seqlens.tolist(), cu.tolist())
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    total = int(cu[-1])
    close = ((packed.x[:total].float() - x[:total].float()).abs() <= atol + rtol * x[:total].float().abs()).all(1)
    for what, row_ok in (("sizes differ", packed.size[:total] == size[:total]), ("x differs", close)):
        if not bool(row_ok.all()):
            row = int((~row_ok).nonzero()[0])
            image = int(torch.searchsorted(cu, torch.tensor(row, dtype=cu.dtype, device=cu.device), right=True)) - 1
            raise AssertionError(f"image {image}: {what} from the padded path's (packed row {row})")
    assert torch.equal(packed.pos_map, pos_map), "pos_map differs from the padded path"
    assert torch.all(packed.x[total:] == 0) and torch.all(packed.size[total:] == 0), "rows past the total not zero"


# packed: dtome_merge_varlen; padded: pad -> dtome_merge -> pack (the baseline);
# padded-op-only: dtome_merge alone on the batch padded beforehand (the baseline's own merge)
MERGE_PATHS = ("packed", "padded", "padded-op-only")
MERGE_ROUNDS = 10


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", list(MERGE_SHAPES))
def test_merge_varlen(benchmark, shape, batch, backend):
    """``dk.dtome_merge_varlen`` against pad -> ``dk.dtome_merge`` -> pack with the same backend
    (and the padded op alone), the three once per round, interleaved as the encoder cases; the
    last round's results are checked to agree (so CI runs it as a smoke test)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    inputs, longest = merge_inputs(shape, batch, dtype)
    xp, mp, sp, lengths_p, pos_padded = pad_packed(inputs["x"], inputs["metric"], inputs["size"],
                                                   inputs["cu_seqlens"], inputs["pos_map"], longest)
    paths = {
        "packed": lambda: dk.dtome_merge_varlen(**inputs, max_seqlen=longest, backend=backend),
        "padded": lambda: merge_through_padding(**inputs, longest=longest, backend=backend),
        "padded-op-only": lambda: dk.dtome_merge(xp, mp, sp, lengths_p, inputs["threshold"], pos_map=pos_padded,
                                                 protect_first=inputs["protect_first"], backend=backend),
    }
    assert tuple(paths) == MERGE_PATHS
    n, c, d, _ = MERGE_SHAPES[shape]
    lengths = lengths_p.tolist()
    dtype_name = "fp32" if dtype == torch.float32 else "bf16"
    label = f"{shape} B={batch}"
    costs = {"packed": dtome_merge_varlen_cost(lengths, n, c, d, dtype_name),
             "padded": dtome_merge_varlen_cost(lengths, n, c, d, dtype_name, padded=True),
             "padded-op-only": dtome_merge_cost(batch, longest, c, d, dtype_name, n0=n)}
    for path, cost in costs.items():
        _COSTS[("merge", label, path)] = cost
    benchmark.group = f"dtome_merge_varlen {label}, packed and padded paths once per round"
    benchmark.extra_info.update(impl=backend, op="dtome_merge_varlen", shape=label, device=str(DEVICE),
                                dtype=str(dtype), rows=sum(lengths), padded_rows=batch * longest,
                                roofline=costs["packed"].as_dict(),
                                roofline_by_path={path: cost.as_dict() for path, cost in costs.items()})
    seconds, outputs = time_interleaved(benchmark, paths, MERGE_ROUNDS)
    packed = outputs["packed"]  # the last round's results (the only one without --benchmark-enable)
    assert_same_merge(packed, outputs["padded"], dtype)
    assert int(packed.cu_seqlens[-1]) < int(inputs["cu_seqlens"][-1]), "nothing merged: the check would be vacuous"
    if seconds is not None:
        benchmark.extra_info["seconds"] = seconds
        _MEDIANS[("merge", shape, batch, backend)] = seconds


# ------------------------------------------------------------------ encoder on the demo photos


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("transformers")
    from dymu.app.assets import load_dinov2
    from dymu.calibration import load_thresholds
    from dymu.app.demo import thresholds_path
    from dymu.app.photos import load_photos

    vit, preprocess = load_dinov2(device=DEVICE)
    pixels = preprocess([img for _, img in load_photos()]).to(DEVICE)
    thresholds = {s: load_thresholds(thresholds_path(s), num_layers=vit.config.num_hidden_layers) for s in SETTINGS}
    return vit, pixels, thresholds


ENCODER_CASES = [("stock-hf", None), ("unmerged-loop", None)] + [(impl, s) for s in SETTINGS for impl in ("packed", "padded")]
ENCODER_ROUNDS = 4


def test_encoder_demo_photos(benchmark, demo):
    """All encoder cases once per round, interleaved, so the load of a shared machine hits them
    alike; per case the best round counts (as in ``dymu demo``), and per round the ratios."""
    from dymu import DToMeEncoder

    vit, pixels, thresholds = demo
    encoders = {}
    for impl, setting in ENCODER_CASES:
        if impl == "stock-hf":
            encoders[(impl, setting)] = lambda p: vit(pixel_values=p)  # noqa: E731
        elif impl == "unmerged-loop":
            encoders[(impl, setting)] = DToMeEncoder(vit, math.inf, layout="padded")
        else:
            encoders[(impl, setting)] = DToMeEncoder(vit, thresholds[setting], layout=impl)
    benchmark.group = "DToMeEncoder, 13 demo photos (DINOv2-S/14), every case once per round"
    benchmark.extra_info.update(impl="all cases", op="encoder", shape="13 photos", device=str(DEVICE))
    warm, outputs = time_interleaved(benchmark, {case: functools.partial(encoder, pixels)
                                                 for case, encoder in encoders.items()}, ENCODER_ROUNDS)
    if warm is not None:  # --benchmark-disable: one plain run, no summary
        benchmark.extra_info["seconds"] = {f"{i}-{s}" if s else i: t for (i, s), t in warm.items()}
        _MEDIANS["enc_rounds"] = warm
    cfg = vit.config
    mlp_dim = int(cfg.hidden_size * cfg.mlp_ratio)
    for setting in SETTINGS:
        out = outputs[("packed", setting)]
        ll = out.layer_lengths.float().cpu()
        _MEDIANS[("ideal", setting)] = flop_ideal_speedup(out.layer_lengths.cpu(), out.pos_map.shape[1],
                                                          cfg.hidden_size, mlp_dim)
        _MEDIANS[("rows", setting)] = (float((ll.sum(1) / out.pos_map.numel()).mean()),
                                       float((ll.max(1).values * ll.shape[1] / out.pos_map.numel()).mean()))


def test_encoder_summary():
    """Ratios of the run above (needs --benchmark-enable and the encoder case); written to
    results/varlen_encoder_<device>.{json,md} with the attention and merge tables of the same run."""
    if "enc_rounds" not in _MEDIANS:
        pytest.skip("benchmarks disabled or the encoder cases did not run")
    rounds = _MEDIANS["enc_rounds"]
    best = {case: min(t) for case, t in rounds.items()}

    def per_round(a, b):  # median over rounds of time(a) / time(b) measured in the same round
        return median_ratio(rounds[a], rounds[b])

    base = ("unmerged-loop", None)
    summary = {"device": str(DEVICE), "clock": "process CPU time, 1 thread" if DEVICE.type == "cpu" else "wall clock",
               "rounds": len(rounds[base]),
               "stock_hf_s": best[("stock-hf", None)], "unmerged_loop_s": best[base], "settings": {}}
    from dymu.app.report import machine_info

    machine = machine_info()
    summary["machine"] = machine
    head = (f"Machine: {machine['gpu'] or machine['cpu']} ({machine['cpu_count']} CPUs), torch {machine['torch']}, "
            f"{machine['date']}, 1-min load average {machine['load_avg_1min']} at the end of the run. "
            f"Clock: {summary['clock']}.")
    lines = [head, "", "| setting | rows kept / processed padded | packed | padded | packed vs padded | speedup vs unmerged | FLOP-ideal | % of ideal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in SETTINGS:
        packed, padded = ("packed", s), ("padded", s)
        ideal = _MEDIANS[("ideal", s)]
        kept, processed = _MEDIANS[("rows", s)]
        vs_padded, speed = per_round(padded, packed), per_round(base, packed)
        summary["settings"][s] = dict(packed_s=best[packed], padded_s=best[padded], packed_vs_padded=vs_padded,
                                      speedup_vs_unmerged=speed, flop_ideal=ideal, fraction_of_ideal=speed / ideal,
                                      rows_kept=kept, rows_processed_padded=processed)
        lines.append(f"| {s} | {kept:.2f} / {processed:.2f} | {best[packed] * 1e3:.0f} ms | {best[padded] * 1e3:.0f} ms | "
                     f"{vs_padded:.2f}x | {speed:.2f}x | {ideal:.2f}x | {100 * speed / ideal:.0f}% |")
    lines.append(f"unmerged loop {best[base] * 1e3:.0f} ms, stock HF {best[('stock-hf', None)] * 1e3:.0f} ms "
                 f"(best of {len(rounds[base])} interleaved rounds; ratios: median over rounds)")
    lines += ["", *attention_table(summary), "", *merge_table(summary)]
    print("\n" + "\n".join(lines))
    folder = os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(folder, f"varlen_encoder_{DEVICE.type}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, f"varlen_encoder_{DEVICE.type}.json"), "w") as f:
        json.dump(summary, f, indent=2)


def attention_table(summary: dict) -> list:
    """Markdown rows of this run's attention cases (best of rounds), each against masked SDPA on
    the padded batch, beside the FLOP ratio of the two (the speedup a compute-bound kernel could
    reach); fills summary["attention_s"]."""
    attn = {}
    for key, value in _MEDIANS.items():
        if key[0] == "attn":
            attn.setdefault(f"{key[1]} B={key[2]}", {})[key[3]] = value
    summary["attention_s"] = attn
    lines = ["| attention | impl | packed | masked SDPA, padded | speedup | FLOPs padded / packed |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, impls in attn.items():
        base = impls.get("sdpa-masked-padded")
        flops = _COSTS.get(("attn", label, "sdpa-masked-padded")), _COSTS.get(("attn", label, "packed"))
        ideal = f"{flops[0].flops / flops[1].flops:.2f}x" if all(flops) else "-"
        for impl, t in impls.items():
            if impl != "sdpa-masked-padded" and base:
                lines.append(f"| {label} | {impl} | {t * 1e3:.1f} ms | {base * 1e3:.1f} ms | {base / t:.2f}x | {ideal} |")
    roof = {}
    for (kind, label, path), cost in _COSTS.items():
        if kind == "attn":
            roof.setdefault(label, {})[path] = cost.as_dict()
    summary["attention_roofline"] = roof
    lines.append("Best of 5 rounds per case. FLOPs padded / packed: the roofline model's QK^T and PV FLOPs "
                 "(benchmarks/roofline.py), the speedup a compute-bound kernel could reach.")
    return lines


def merge_table(summary: dict) -> list:
    """Markdown rows of this run's merge cases: per backend the packed op against pad -> padded
    op -> pack (and the padded op's own share of that): best of rounds, speedups as the median
    over rounds of the per-round ratio; beside them the model's ideal bytes and FLOPs of both
    (benchmarks/roofline.py), and on a GPU the packed op's fraction of that GPU's roofline.
    Fills summary["merge_s"] (the per-round seconds) and summary["merge_roofline"]."""
    merge = {}
    for key, value in _MEDIANS.items():
        if key[0] == "merge":
            merge.setdefault(f"{key[1]} B={key[2]}", {})[key[3]] = value
    summary["merge_s"] = merge
    gpu = gpu_of(torch.cuda.get_device_name(0)) if DEVICE.type == "cuda" else None
    head = ("| merge step | backend | packed | pad, merge, pack | speedup | of which dtome_merge | "
            "packed vs dtome_merge alone | ideal MB packed / padded | FLOPs padded / packed |")
    lines = [head + (f" packed vs {gpu} roofline |" if gpu else ""),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else "")]
    for label, backends in merge.items():
        cost = {path: _COSTS[("merge", label, path)] for path in MERGE_PATHS}
        for backend, rounds in backends.items():
            best = {path: min(t) for path, t in rounds.items()}
            line = (f"| {label} | {backend} | {best['packed'] * 1e3:.2f} ms | {best['padded'] * 1e3:.2f} ms | "
                    f"{median_ratio(rounds['padded'], rounds['packed']):.2f}x | "
                    f"{best['padded-op-only'] * 1e3:.2f} ms | "
                    f"{median_ratio(rounds['padded-op-only'], rounds['packed']):.2f}x | "
                    f"{cost['packed'].ideal_bytes / 1e6:.1f} / {cost['padded'].ideal_bytes / 1e6:.1f} | "
                    f"{cost['padded-op-only'].flops / cost['packed'].flops:.2f}x |")
            if gpu:
                line += f" {100 * cost['packed'].roofline_s(gpu) / best['packed']:.1f}% |"
            lines.append(line)
    roof = {}
    for (kind, label, path), c in _COSTS.items():
        if kind == "merge":
            roof.setdefault(label, {})[path] = c.as_dict()
    summary["merge_roofline"] = roof
    lines.append(f"All three paths once per round, interleaved, {MERGE_ROUNDS} rounds; times: best round; "
                 f"speedups: median over rounds of the per-round ratio (> 1: packed faster). "
                 f"{MERGES_PER_IMAGE} merges per image. pad, merge, pack: ``merge_through_padding`` with the "
                 "same backend; dtome_merge alone: the padded op on the batch padded beforehand. Ideal MB: "
                 "the roofline model (benchmarks/roofline.py); the padded figure includes the copies.")
    return lines
