"""Paired decode-step timings: merged cache (native) vs full-cache SDPA, calls interleaved.

On a shared, loaded machine the load drifts between pytest-benchmark cases; alternating the
two implementations call by call and taking the median of each makes their ratio robust to
that drift. Same shapes and inputs as test_bench_decode.py. Run:

    PYTHONPATH=.:python_api python benchmarks/decode_ratios.py [--threads 1] [--calls 30]
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dymu_kernels as dk  # noqa: E402
from test_bench_decode import DTYPE, SHAPES, cache_bytes, make_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--backend", default="native")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| shape ({str(DTYPE).replace('torch.', '')}, {args.threads} thread(s), median of {args.calls} interleaved calls) "
          f"| full-cache SDPA | {args.backend} (speedup) | cache bytes full / merged |")
    print("| --- | ---: | ---: | ---: |")
    for shape in SHAPES:
        c = make_case(shape)
        pos = c["num_pos"] - 1
        half = c["d"] // 2
        cos_q, sin_q = c["cos"][pos].to(DTYPE), c["sin"][pos].to(DTYPE)
        q = c["q"]

        def full():
            q_rot = q * cos_q + torch.cat([-q[..., half:], q[..., :half]], -1) * sin_q
            return F.scaled_dot_product_attention(q_rot, c["k_full"], c["v_full"], enable_gqa=c["hq"] != c["hkv"])

        def merged():
            return dk.vtu_decode_attention(q, c["k_rows"], c["v_rows"], c["cos"], c["sin"], c["pos_map"],
                                           c["q_positions"], backend=args.backend)

        times = {full: [], merged: []}
        for fn in (full, merged):
            fn()
        for _ in range(args.calls):
            for fn in (full, merged):
                start = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - start)
        med = {fn: sorted(ts)[len(ts) // 2] for fn, ts in times.items()}
        b = cache_bytes(c)
        print(f"| {shape} | {med[full] * 1e3:.2f} ms | {med[merged] * 1e3:.2f} ms ({med[full] / med[merged]:.2f}x) | "
              f"{b['full_cache_bytes'] / 2**20:.1f} / {b['merged_cache_bytes'] / 2**20:.1f} MiB ({b['cache_ratio']:.2f}x) |",
              flush=True)


if __name__ == "__main__":
    main()
