"""Benchmark report: a markdown table and a PNG plot from a pytest-benchmark JSON file.

The suites in ``benchmarks/`` follow one convention (benchmarks/harness.py): each benchmark's
``group`` is a shape label and its ``extra_info`` holds ``impl`` ("official-eager",
"fast-path", "reference", "native", "triton", ...), ``op``, ``shape`` and optionally
``peak_bytes``. The baselines are "official-eager" (DToMe ops), "fast-path" (VTU),
"full-cache-sdpa" (VTU decode) and "sdpa-masked-padded" (varlen attention); every
other implementation is reported as a speedup against the baseline of the same op and shape in
the same run (baseline median / median, > 1 is faster). Absolute times are only comparable
within one run on one machine, so each report is tagged with the machine.

    machine_info() -> dict                      this machine: CPU model / GPU name, versions, date
    machine_tag(info) -> str                    folder-safe tag, e.g. "cpu-amd-epyc-2cpu"
    load_results(path) -> (machine, rows)       rows: one dict per benchmark
    render_markdown(machine, rows) -> str
    render_plot(machine, rows, path) -> path    matplotlib, Agg backend
    render_report(json_path, out_dir) -> {"markdown": path, "png": path}
    run_bench(out_dir=None, keyword=None) -> int   what ``dymu bench`` does
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from .._atomic import atomic_write, write_text

BASELINES = ("official-eager", "fast-path", "full-cache-sdpa", "sdpa-masked-padded")
IMPL_ORDER = ("official-eager", "fast-path", "full-cache-sdpa", "sdpa-masked-padded", "reference", "native", "triton")


# --------------------------------------------------------------------------------------------
# machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the report says so
        return None


def machine_info() -> dict:
    """Describe this machine for a report: ``{"cpu", "cpu_count", "gpu" (name or None),
    "torch", "triton", "cuda", "python", "platform", "date", "load_avg_1min", "tag"}`` (the load
    average says whether other work shared the CPUs while benchmarking)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu,
        "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    info["tag"] = machine_tag(info)
    return info


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|with .*)\b|@.*$", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_tag(info: dict) -> str:
    """Folder-safe tag: the GPU name when there is one, else the CPU model and core count."""
    if info.get("gpu"):
        return _slug(info["gpu"])
    return f"cpu-{_slug(info.get('cpu') or 'unknown')}-{info.get('cpu_count') or '?'}cpu"


# --------------------------------------------------------------------------------------------
# reading pytest-benchmark JSON


def _machine_from_json(data: dict) -> dict:
    raw = data.get("machine_info") or {}
    if isinstance(raw.get("dymu"), dict):  # written by `dymu bench`
        machine = dict(raw["dymu"])
    else:  # a plain pytest-benchmark file: use what it recorded
        cpu = raw.get("cpu") or {}
        machine = {"cpu": cpu.get("brand_raw") or raw.get("processor") or "unknown CPU", "cpu_count": cpu.get("count"),
                   "gpu": None, "torch": None, "triton": None, "cuda": None, "python": raw.get("python_version"),
                   "platform": raw.get("system")}
    if data.get("datetime"):
        machine["date"] = data["datetime"][:16].replace("T", " ")
    machine.setdefault("tag", machine_tag(machine))
    machine["pytest_benchmark"] = data.get("version")
    return machine


def load_results(path) -> tuple:
    """Read a ``--benchmark-json`` file.

    Returns ``(machine, rows)``: ``machine`` as in ``machine_info()`` (from the file's
    ``machine_info["dymu"]`` when ``dymu bench`` wrote it), and one row per benchmark:
    ``{"name", "group", "op", "shape", "impl", "median", "iqr", "rounds", "peak_bytes", "device"}``
    with times in seconds. Missing ``extra_info`` keys fall back to the group (op = its first
    word, shape = the rest) and to the test's ``impl``/``backend`` parameter.
    """
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        extra, params, stats = bench.get("extra_info") or {}, bench.get("params") or {}, bench["stats"]
        group = bench.get("group") or bench.get("name", "?")
        op = extra.get("op") or group.split(" ", 1)[0]
        shape = extra.get("shape") or (group.split(" ", 1)[1] if " " in group else group)
        impl = extra.get("impl") or params.get("impl") or params.get("backend") or bench.get("param") or bench.get("name", "?")
        rows.append({"name": bench.get("name"), "group": group, "op": str(op), "shape": str(shape), "impl": str(impl),
                     "median": float(stats["median"]), "iqr": float(stats.get("iqr", 0.0)), "rounds": stats.get("rounds"),
                     "peak_bytes": extra.get("peak_bytes"), "device": extra.get("device"),
                     "roofline": extra.get("roofline")})
    return _machine_from_json(data), rows


def _impl_key(impl: str):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def pivot(rows) -> dict:
    """``{op: {"impls": [...], "shapes": [...], "cells": {(shape, impl): row}, "baseline": impl|None}}``
    with ops and shapes in first-seen order and implementations baselines first."""
    table = {}
    for row in rows:
        entry = table.setdefault(row["op"], {"impls": [], "shapes": [], "cells": {}, "baseline": None})
        if row["shape"] not in entry["shapes"]:
            entry["shapes"].append(row["shape"])
        if row["impl"] not in entry["impls"]:
            entry["impls"].append(row["impl"])
        entry["cells"][(row["shape"], row["impl"])] = row
    for entry in table.values():
        entry["impls"].sort(key=_impl_key)
        entry["baseline"] = next((impl for impl in BASELINES if impl in entry["impls"]), None)
    return table


def speedup(entry: dict, shape: str, impl: str):
    """Baseline median / ``impl`` median for one shape, or None without a baseline there."""
    base = entry["cells"].get((shape, entry["baseline"])) if entry["baseline"] else None
    cell = entry["cells"].get((shape, impl))
    if base is None or cell is None or cell["median"] <= 0:
        return None
    return base["median"] / cell["median"]


# --------------------------------------------------------------------------------------------
# rendering


def format_time(seconds: float) -> str:
    """Seconds -> "12.3 us" / "4.56 ms" / "1.23 s" (3 significant digits)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def _format_bytes(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.3g} MiB"


def machine_line(machine: dict) -> str:
    device = f"GPU {machine['gpu']}" if machine.get("gpu") else f"CPU {machine.get('cpu')} ({machine.get('cpu_count') or '?'} logical CPUs)"
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "triton", "cuda", "python", "pytest_benchmark") if machine.get(k))
    load = f"; load average {machine['load_avg_1min']} at start" if machine.get("load_avg_1min") is not None else ""
    return f"{device}; {versions or 'versions not recorded'}; {machine.get('date', 'date not recorded')}{load}"


def render_markdown(machine: dict, rows, source: str | None = None) -> str:
    """The report as markdown: one table per op, a row per shape, a column per implementation
    holding the median time and the speedup against the baseline, then peak memory if recorded."""
    lines = [f"# Benchmark report: {machine.get('tag', 'unknown machine')}", "",
             f"- Machine: {machine_line(machine)}"]
    if source:
        lines.append(f"- Data: `{source}` ({len(rows)} benchmarks)")
    lines += ["- Median wall-clock time per call; `(N.Nx)` is the speedup against the baseline of the same op and shape "
              f"in this run (baseline median / median, > 1 is faster). Baselines: {', '.join(BASELINES)}. "
              "Compare ratios, not absolute times across machines.", ""]
    for op, entry in pivot(rows).items():
        lines += [f"## {op}", "", "| shape | " + " | ".join(entry["impls"]) + " |",
                  "|---|" + "---:|" * len(entry["impls"])]
        for shape in entry["shapes"]:
            cells = []
            for impl in entry["impls"]:
                row = entry["cells"].get((shape, impl))
                if row is None:
                    cells.append("–")
                    continue
                ratio = speedup(entry, shape, impl)
                suffix = " (baseline)" if impl == entry["baseline"] else (f" ({ratio:.2f}x)" if ratio is not None else "")
                cells.append(format_time(row["median"]) + suffix)
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        if any(row.get("peak_bytes") is not None for row in entry["cells"].values()):
            lines += ["", f"Peak memory per call ({op}):", "", "| shape | " + " | ".join(entry["impls"]) + " |",
                      "|---|" + "---:|" * len(entry["impls"])]
            for shape in entry["shapes"]:
                cells = [_format_bytes((entry["cells"].get((shape, impl)) or {}).get("peak_bytes")) for impl in entry["impls"]]
                lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        lines += _roofline_lines(machine, op, entry)
        lines.append("")
    if not rows:
        lines += ["No benchmarks in this file.", ""]
    model = roofline_model_table()
    if model:
        lines += ["## Roofline for the LLaVA-1.5 and LLaVA-OneVision shapes (model, not measured)", "", model, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# roofline (benchmarks/roofline.py: ideal HBM bytes, FLOPs, the kernels' own tiling bytes)

# HBM bytes/s, bf16 tensor FLOP/s, fp32 FLOP/s; the same figures as benchmarks/roofline.py
ROOFLINE_GPUS = {"H100": (3.35e12, 989e12, 67e12), "H200": (4.8e12, 989e12, 67e12), "A100": (2.0e12, 312e12, 19.5e12)}


def _roofline_gpu(machine: dict):
    name = (machine.get("gpu") or "").upper()
    return next((key for key in ROOFLINE_GPUS if key in name), None)


def roofline_seconds(roof: dict, gpu: str) -> float:
    """max(ideal bytes / bandwidth, FLOPs / peak) on ``gpu`` for a benchmark's ``roofline`` info."""
    bandwidth, tensor_peak, fp32_peak = ROOFLINE_GPUS[gpu]
    peak = tensor_peak if roof.get("tensor_cores") else fp32_peak
    return max(roof["ideal_bytes"] / bandwidth, roof["flops"] / peak)


def _roofline_lines(machine: dict, op: str, entry: dict) -> list:
    """A table of the model's bytes / FLOPs per shape beside the measured medians: on an
    H100/H200/A100 the fraction of the roofline each implementation reaches (roofline time /
    median); elsewhere the H100 roofline time for reference."""
    shapes = [shape for shape in entry["shapes"]
              if any((entry["cells"].get((shape, impl)) or {}).get("roofline") for impl in entry["impls"])]
    if not shapes:
        return []
    gpu = _roofline_gpu(machine)
    impls = [impl for impl in entry["impls"] if impl not in BASELINES] or entry["impls"]
    head = ["shape", "ideal bytes", "kernel bytes", "GFLOP", f"{gpu or 'H100'} roofline"]
    head += [f"{impl} of roofline" for impl in impls] if gpu else []
    lines = ["", f"Roofline ({op}; model from benchmarks/roofline.py"
             + (f", fractions on this {gpu}):" if gpu else "; no H100/H200/A100 here, so no fraction):"), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for shape in shapes:
        roof = next(r["roofline"] for r in (entry["cells"].get((shape, i)) for i in entry["impls"]) if r and r.get("roofline"))
        seconds = roofline_seconds(roof, gpu or "H100")
        cells = [shape, _format_bytes(roof["ideal_bytes"]), _format_bytes(roof["kernel_bytes"]),
                 f"{roof['flops'] / 1e9:.3g}", format_time(seconds)]
        if gpu:
            for impl in impls:
                row = entry["cells"].get((shape, impl))
                cells.append(f"{100 * seconds / row['median']:.3g}%" if row and row["median"] > 0 else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def roofline_model_table():
    """The "model, not measured" markdown table of benchmarks/roofline.py, or None when that
    file cannot be found (the report then leaves it out)."""
    import importlib.util

    try:
        path = find_benchmarks_dir() / "roofline.py"
        spec = importlib.util.spec_from_file_location("dymu_benchmarks_roofline", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module.model_table()
    except Exception:  # noqa: BLE001 - the report works without the model
        return None


def _label_log_axis(ax, label) -> None:
    """Label a log axis at 1, 2 and 5 times each power of ten (and nowhere else)."""
    import math

    import matplotlib.ticker

    def fmt(value, _):
        if value <= 0:
            return ""
        leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return label(value) if any(abs(leading - k) < 1e-6 for k in (1, 2, 5)) else ""

    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(fmt))
    ax.tick_params(axis="x", which="both", labelsize=7)


def render_plot(machine: dict, rows, path) -> Path:
    """Save a PNG: per op, horizontal bars of each implementation's speedup against the
    baseline per shape (log scale, 1x marked), or median times when the op has no baseline."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    table = pivot(rows)
    ops = list(table) or ["(no benchmarks)"]
    heights = [max(2.0, 0.45 * len(table[op]["shapes"]) * max(1, len(table[op]["impls"]) - 1) ** 0.5 + 1.2) if op in table else 2.0 for op in ops]
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, op in zip(axes[:, 0], ops):
        entry = table.get(op)
        if entry is None:
            ax.text(0.5, 0.5, "no benchmarks", ha="center", va="center")
            ax.set_axis_off()
            continue
        shown = [impl for impl in entry["impls"] if impl != entry["baseline"]] if entry["baseline"] else entry["impls"]
        shown = shown or entry["impls"]
        width = 0.8 / len(shown)
        lows = []
        for i, impl in enumerate(shown):
            ys, values = [], []
            for j, shape in enumerate(entry["shapes"]):
                value = speedup(entry, shape, impl) if entry["baseline"] else (entry["cells"].get((shape, impl)) or {}).get("median")
                if value:
                    ys.append(j + (i - (len(shown) - 1) / 2) * width)
                    values.append(value)
            color = colors[_impl_key(impl)[0] % len(colors)]
            if entry["baseline"]:  # bars grow from 1x: right is faster, left is slower
                ax.barh(ys, [v - 1.0 for v in values], left=1.0, height=width, color=color, label=impl)
                for y, v in zip(ys, values):
                    ax.text(v, y, f" {v:.2f}x " if v < 10 else f" {v:.0f}x ", va="center", ha="left" if v >= 1 else "right", fontsize=7)
            else:
                ax.barh(ys, values, height=width, color=color, label=impl)
                for y, v in zip(ys, values):
                    ax.text(v, y, " " + format_time(v), va="center", ha="left", fontsize=7)
            lows.extend(values)
        ax.set_yticks(range(len(entry["shapes"])), entry["shapes"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        if entry["baseline"]:
            lows.append(1.0)
            ax.set_xlim(min(lows) / 1.6, max(lows) * 1.6)
            ax.axvline(1.0, color="black", linewidth=0.8)
            _label_log_axis(ax, lambda v: f"{v:g}x")
            ax.set_xlabel(f"speedup vs {entry['baseline']} (baseline median / median, log scale; > 1 is faster)")
        else:
            if lows:
                ax.set_xlim(min(lows) / 2, max(lows) * 3)
            _label_log_axis(ax, format_time)
            ax.set_xlabel("median time per call (s, log scale; no baseline for this op)")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle(f"{machine.get('tag', '')}\n{machine_line(machine)}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:  # never a half-written PNG
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def render_report(json_path, out_dir) -> dict:
    """Render ``report.md`` and ``report.png`` from a pytest-benchmark JSON into ``out_dir``.

    Returns ``{"markdown": Path, "png": Path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, rows = load_results(json_path)
    try:
        source = os.path.relpath(json_path, out_dir)
    except ValueError:
        source = str(json_path)
    markdown = out_dir / "report.md"
    extra = out_dir / "vtu_memory.md"  # written by benchmarks/memory.py (see run_bench)
    memory = "\n" + extra.read_text() if extra.is_file() else ""
    write_text(markdown, render_markdown(machine, rows, source=source) + "\n" + memory)
    png = render_plot(machine, rows, out_dir / "report.png")
    return {"markdown": markdown, "png": png}


# --------------------------------------------------------------------------------------------
# `dymu bench`


def find_benchmarks_dir() -> Path:
    """``./benchmarks`` if it exists, else the one in the source checkout this package lives in."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    checkout = Path(__file__).resolve().parents[3] / "benchmarks"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("no benchmarks/ folder: run `dymu bench` from the dymu-kernels checkout")


def run_bench(out_dir=None, keyword: str | None = None, bench_dir=None, pytest_args=()) -> int:
    """Run the benchmark suites with pytest-benchmark, then render the report.

    Writes ``benchmark.json`` (with this machine's description added), ``report.md`` and
    ``report.png`` into ``out_dir`` (default ``benchmarks/results/<machine tag>/``) and prints
    where they went; a full run (no ``keyword``) also writes ``vtu_memory.md`` (benchmarks/memory.py:
    VTU peak memory per backend), which the report appends. ``keyword`` is passed to pytest as ``-k``. Returns pytest's exit code
    (the report is still rendered when some benchmarks failed but results were written).
    """
    bench_dir = Path(bench_dir) if bench_dir else find_benchmarks_dir()
    machine = machine_info()
    out_dir = Path(out_dir) if out_dir else bench_dir / "results" / machine["tag"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "benchmark.json"
    partial = out_dir / ".benchmark.json.partial"  # pytest writes here; benchmark.json only ever appears whole
    command = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-enable", f"--benchmark-json={partial}",
               "-q", "-p", "no:cacheprovider", *(["-k", keyword] if keyword else []), *pytest_args]
    print("dymu bench: " + " ".join(command), flush=True)
    try:
        code = subprocess.call(command, cwd=bench_dir.parent)
        if not partial.is_file():
            print(f"dymu bench: pytest exited with {code} and wrote no results", file=sys.stderr)
            return code or 1
        data = json.loads(partial.read_text())
    finally:
        partial.unlink(missing_ok=True)
    memory_script = bench_dir / "memory.py"  # VTU peak memory per backend (measured / model)
    if memory_script.is_file() and not keyword:
        subprocess.call([sys.executable, str(memory_script), "--out", str(out_dir / "vtu_memory.md")], cwd=bench_dir.parent)
    data.setdefault("machine_info", {})["dymu"] = machine
    write_text(json_path, json.dumps(data, indent=2) + "\n")
    paths = render_report(json_path, out_dir)
    print(f"dymu bench: {len(data.get('benchmarks', []))} benchmarks on {machine_line(machine)}")
    print(f"dymu bench: report  {paths['markdown']}")
    print(f"dymu bench: plot    {paths['png']}")
    print(f"dymu bench: data    {json_path}")
    return code
