"""Benchmark harness: device choice and helpers shared by the suites (not a conftest, so it
cannot shadow tests/conftest.py when both folders run in one pytest session).

Run: `make bench` (or `pytest benchmarks --benchmark-enable`). Each benchmark's `group` is the
shape label and `extra_info` holds {"impl", "op", "shape", "device", "peak_bytes"}; the
baselines are impl "official-eager" (DToMe) and "fast-path" (VTU). Compare implementations as
ratios within one run; never as absolute times across runs. `dymu bench` renders the report.

Environment variables (read once, here):
- DYMU_BENCH_LARGE=1: also run the cases too slow for a CPU by default (the varlen attention
  at B=64, where masked SDPA takes seconds per call); on a GPU they always run.
"""

import contextlib
import os
import time

import torch

from dymu_kernels._backends import implements

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH_LARGE = DEVICE.type == "cuda" or os.environ.get("DYMU_BENCH_LARGE", "") not in ("", "0")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def kernel_backends(op: str):
    """Backends worth timing on this machine (the Triton interpreter is never timed)."""
    names = ["reference"]
    if implements("native", op) and (DEVICE.type == "cpu" or _native_cuda()):
        names.append("native")
    if DEVICE.type == "cuda" and implements("triton", op):
        names.append("triton")
    return names


def _native_cuda() -> bool:
    from dymu_kernels import _C

    return _C.built_with_cuda()


@contextlib.contextmanager
def _one_thread_on_cpu():
    """torch on one thread while timing on a CPU (the process-CPU-time clock), restored after."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_best(benchmark, run, rounds: int = 5):
    """Time ``run`` through ``benchmark.pedantic`` (one warmup round) and return its best round in
    seconds, or None when benchmarking is disabled (then ``run`` ran once, as a smoke test).

    On a CPU the clock is the process CPU time with torch on one thread, which the load of other
    processes on a shared machine does not inflate (wall clock there ran 3-5x the CPU time,
    varying by the minute); recorded as extra_info["cpu_seconds_1_thread"]. On a GPU the wall
    clock of pytest-benchmark.
    """
    if DEVICE.type == "cpu":
        seconds = []

        def timed():
            start = time.process_time()
            run()
            seconds.append(time.process_time() - start)

        with _one_thread_on_cpu():
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        best = min(seconds[1:] or seconds)
        benchmark.extra_info["cpu_seconds_1_thread"] = best
    else:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        best = benchmark.stats.stats.min if benchmark.stats is not None else None
    return None if getattr(benchmark, "disabled", False) else best


def time_interleaved(benchmark, cases: dict, rounds: int):
    """Run every case (name -> zero-argument callable) once per round, one after the other, so
    the load of a shared machine hits them alike; one warmup round. Same clocks as
    :func:`time_best` (on a CPU: process CPU time of one thread).

    Returns (seconds, outputs): seconds {name: [one time per round]} (None when benchmarking is
    disabled: then one round ran, as a smoke test), outputs {name: its last result}.
    """
    on_cpu = DEVICE.type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter
    times = {name: [] for name in cases}
    outputs = {}

    def one_round():
        for name, case in cases.items():
            start = clock()
            with torch.no_grad():
                outputs[name] = case()
            sync()
            times[name].append(clock() - start)

    with _one_thread_on_cpu():
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["clock"] = "process CPU time, 1 thread" if on_cpu else "wall clock"
    if getattr(benchmark, "disabled", False):
        return None, outputs
    return {name: t[1:] if len(t) > rounds else t for name, t in times.items()}, outputs  # drop the warmup


def median_ratio(a, b) -> float:
    """Median over rounds of a[i] / b[i], the times of two cases measured in the same round."""
    ratios = sorted(x / y for x, y in zip(a, b))
    return ratios[len(ratios) // 2]
