"""Packed variable-length DToMe (issue 12): attention and encoder wall-clock, as ratios in one run.

1. ``proportional_attention_varlen`` per backend against what the padded encoder runs: SDPA on
   the batch padded to its longest image with the float log-size mask [B, 1, 1, N] (-inf on
   padding). Shapes: CLIP ViT-L/14-336 (N=577, 16 heads of 64) and SigLIP SO400M (N=729, 16 heads
   of 72). Lengths per image spread evenly over [0.35 N, N] (the spread of kept fractions that
   the shipped mid thresholds give on the demo photos is about 0.4-1.0), sizes summing to N.
   B = 8 and 64 on a GPU; on a CPU B = 64 only with DYMU_BENCH_LARGE=1 in the environment
   (masked SDPA takes seconds per call there; CI runs B = 8 only).
2. ``DToMeEncoder`` on the 13 demo photos (DINOv2-S/14, 224 px) per shipped setting: packed,
   padded, the unmerged loop (every threshold +inf) and the stock HF model, plus the FLOP-ideal
   speedup over the unmerged loop from the per-block lengths (q/k/v/out projections and
   attention on the rows entering the block, MLP on the rows after its merge).
   All cases run once per round, interleaved (a shared machine's load then hits them alike); on a
   CPU the clock is the process CPU time of one thread (robust against other processes' load);
   ``test_encoder_summary`` prints best-of-rounds times and the per-round median ratios and
   writes them to ``results/varlen_encoder_<device>.json``.
"""

import json
import math
import os

import pytest
import torch

from dymu.app.encoder_cost import flop_ideal_speedup

import dymu_kernels as dk
from harness import BENCH_LARGE, DEVICE, kernel_backends, sync, time_best

ATTN_SHAPES = {"CLIP-L/14-336": (577, 16, 64), "SigLIP-SO400M": (729, 16, 72)}
ATTN_BATCHES = (8, 64) if BENCH_LARGE else (8,)
ATTN_IMPLS = ["sdpa-masked-padded"] + [b for b in kernel_backends("proportional_attention_varlen") if b != "reference"]
SETTINGS = ("low", "mid", "high")
_MEDIANS = {}


def attention_inputs(shape: str, batch: int, dtype):
    n, heads, dim = ATTN_SHAPES[shape]
    g = torch.Generator().manual_seed(batch)
    lengths = torch.linspace(0.35 * n, n, batch).round().long()
    lengths = lengths[torch.randperm(batch, generator=g)]
    sizes = []
    for t in lengths.tolist():  # t rows standing for n patches: sizes >= 1 summing to n
        s = torch.ones(t)
        s.index_add_(0, torch.randint(0, t, (n - t,), generator=g), torch.ones(n - t))
        sizes.append(s)
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
@pytest.mark.parametrize("batch", ATTN_BATCHES)
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
    benchmark.group = f"proportional_attention_varlen {shape} B={batch}"
    benchmark.extra_info.update(impl=impl, op="proportional_attention_varlen", shape=f"{shape} B={batch}",
                                device=str(DEVICE), dtype=str(dtype), rows=int(cu[-1]), padded_rows=batch * longest)
    best = time_best(benchmark, run)  # on a CPU: process CPU time of one thread, as for the encoder
    if best is not None:
        _MEDIANS[("attn", shape, batch, impl)] = best


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
    import time

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
    times = {case: [] for case in ENCODER_CASES}
    outputs = {}
    # On a CPU: the process CPU time of one thread, which the load of other processes on a shared
    # machine does not inflate (wall clock there ran 3-5x the CPU time, varying by the minute).
    # On a GPU: wall clock.
    on_cpu = DEVICE.type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter
    threads = torch.get_num_threads()

    def one_round():
        for case, encoder in encoders.items():
            start = clock()
            with torch.no_grad():
                outputs[case] = encoder(pixels)
            sync()
            times[case].append(clock() - start)

    if on_cpu:
        torch.set_num_threads(1)

    benchmark.group = "DToMeEncoder, 13 demo photos (DINOv2-S/14), every case once per round"
    benchmark.extra_info.update(impl="all cases", op="encoder", shape="13 photos", device=str(DEVICE))
    try:
        benchmark.pedantic(one_round, rounds=ENCODER_ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["clock"] = "process CPU time, 1 thread" if on_cpu else "wall clock"
    warm = {case: t[1:] if len(t) > ENCODER_ROUNDS else t for case, t in times.items()}  # drop the warmup
    benchmark.extra_info["seconds"] = {f"{i}-{s}" if s else i: t for (i, s), t in warm.items()}
    if not getattr(benchmark, "disabled", False):  # --benchmark-disable: one plain run, no summary
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
    """Ratios of the run above (needs --benchmark-enable); written to results/varlen_encoder_<device>.json."""
    if "enc_rounds" not in _MEDIANS:
        pytest.skip("benchmarks disabled or the encoder cases did not run")
    rounds = _MEDIANS["enc_rounds"]
    best = {case: min(t) for case, t in rounds.items()}

    def per_round(a, b):  # median over rounds of time(a) / time(b) measured in the same round
        ratios = sorted(x / y for x, y in zip(rounds[a], rounds[b]))
        return ratios[len(ratios) // 2]

    base = ("unmerged-loop", None)
    summary = {"device": str(DEVICE), "clock": "process CPU time, 1 thread" if DEVICE.type == "cpu" else "wall clock",
               "rounds": len(rounds[base]),
               "stock_hf_s": best[("stock-hf", None)], "unmerged_loop_s": best[base], "settings": {}}
    lines = ["| setting | rows kept / processed padded | packed | padded | packed vs padded | speedup vs unmerged | FLOP-ideal | % of ideal |",
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
    attn = {}
    for key, value in _MEDIANS.items():
        if key[0] == "attn":
            attn.setdefault(f"{key[1]} B={key[2]}", {})[key[3]] = value
    summary["attention_s"] = attn
    for label, impls in attn.items():
        base_attn = impls.get("sdpa-masked-padded")
        for impl, t in impls.items():
            if impl != "sdpa-masked-padded" and base_attn:
                lines.append(f"attention {label}: {impl} {t * 1e3:.1f} ms vs masked SDPA {base_attn * 1e3:.1f} ms "
                             f"({base_attn / t:.2f}x)")
    print("\n" + "\n".join(lines))
    folder = os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(folder, f"varlen_encoder_{DEVICE.type}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, f"varlen_encoder_{DEVICE.type}.json"), "w") as f:
        json.dump(summary, f, indent=2)
