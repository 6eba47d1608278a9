"""dymu.app.report renders the benchmark report from a (synthetic) pytest-benchmark JSON file."""

import json

import pytest

from dymu.app import report

MACHINE = {"cpu": "AMD EPYC 7B13", "cpu_count": 2, "gpu": None, "torch": "2.13.0", "triton": "3.7.1", "cuda": None,
           "python": "3.11.7", "platform": "Linux", "date": "2026-01-01 00:00", "tag": "cpu-amd-epyc-7b13-2cpu"}


def _bench(op, shape, impl, median, peak=None):
    extra = {"impl": impl, "op": op, "shape": shape, "device": "cpu"}
    if peak is not None:
        extra["peak_bytes"] = peak
    return {"group": f"{op} {shape}", "name": f"test_{op}[{shape}-{impl}]", "fullname": f"benchmarks/x.py::test_{op}",
            "params": {"impl": impl}, "extra_info": extra,
            "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median, "stddev": 0.0, "rounds": 5,
                      "median": median, "iqr": median * 0.05, "q1": median, "q3": median, "ops": 1 / median}}


def _write(tmp_path, benchmarks, machine=MACHINE):
    data = {"machine_info": {"node": "x", "python_version": "3.11.7", "cpu": {"brand_raw": "Some CPU", "count": 4}},
            "commit_info": {}, "benchmarks": benchmarks, "datetime": "2026-01-02T03:04:05.000000+00:00",
            "version": "5.3.1"}
    if machine is not None:
        data["machine_info"]["dymu"] = machine
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(data))
    return path


SYNTHETIC = [
    _bench("dtome_merge", "CLIP-L/14-336 B=8", "official-eager", 4e-3, peak=8 << 20),
    _bench("dtome_merge", "CLIP-L/14-336 B=8", "reference", 2e-3, peak=6 << 20),
    _bench("dtome_merge", "CLIP-L/14-336 B=8", "native", 5e-4, peak=2 << 20),
    _bench("dtome_merge", "SigLIP-SO400M B=1", "native", 1e-4),
    _bench("dtome_merge", "SigLIP-SO400M B=1", "official-eager", 3e-4),
    _bench("vtu_attention", "SmolLM2 float32", "fast-path", 1e-2),
    _bench("vtu_attention", "SmolLM2 float32", "reference", 4e-2),
    _bench("other_op", "tiny", "native", 2e-6),  # no baseline: times only
]


def test_load_and_pivot(tmp_path):
    machine, rows = report.load_results(_write(tmp_path, SYNTHETIC))
    assert machine["tag"] == MACHINE["tag"] and machine["date"] == "2026-01-02 03:04"
    table = report.pivot(rows)
    assert list(table) == ["dtome_merge", "vtu_attention", "other_op"]
    dtome = table["dtome_merge"]
    assert dtome["impls"] == ["official-eager", "reference", "native"] and dtome["baseline"] == "official-eager"
    assert report.speedup(dtome, "CLIP-L/14-336 B=8", "native") == pytest.approx(8.0)
    assert report.speedup(dtome, "SigLIP-SO400M B=1", "native") == pytest.approx(3.0)
    assert report.speedup(dtome, "SigLIP-SO400M B=1", "reference") is None  # not run there
    assert table["vtu_attention"]["baseline"] == "fast-path"
    assert report.speedup(table["vtu_attention"], "SmolLM2 float32", "reference") == pytest.approx(0.25)
    assert table["other_op"]["baseline"] is None


def test_render_report(tmp_path):
    paths = report.render_report(_write(tmp_path, SYNTHETIC), tmp_path / "out")
    text = paths["markdown"].read_text()
    assert "# Benchmark report: cpu-amd-epyc-7b13-2cpu" in text
    assert "AMD EPYC 7B13" in text and "torch 2.13.0" in text and "triton 3.7.1" in text
    assert "| CLIP-L/14-336 B=8 | 4 ms (baseline) | 2 ms (2.00x) | 500 us (8.00x) |" in text
    assert "| SigLIP-SO400M B=1 | 300 us (baseline) | – | 100 us (3.00x) |" in text
    assert "| SmolLM2 float32 | 10 ms (baseline) | 40 ms (0.25x) |" in text
    assert "| tiny | 2 us |" in text
    assert "| CLIP-L/14-336 B=8 | 8 MiB | 6 MiB | 2 MiB |" in text
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plain_pytest_benchmark_json(tmp_path):
    """A file not written by `dymu bench` (no machine_info["dymu"], no extra_info) still renders."""
    bare = [dict(_bench("dtome_merge", "B=1", "native", 1e-3), extra_info={})]
    machine, rows = report.load_results(_write(tmp_path, bare, machine=None))
    assert machine["cpu"] == "Some CPU" and machine["tag"] == "cpu-some-4cpu"
    assert rows[0]["op"] == "dtome_merge" and rows[0]["shape"] == "B=1" and rows[0]["impl"] == "native"
    paths = report.render_report(_write(tmp_path, []), tmp_path / "empty")
    assert "No benchmarks" in paths["markdown"].read_text() and paths["png"].is_file()


def test_machine_info_and_tag():
    info = report.machine_info()
    assert info["tag"] == report.machine_tag(info) and info["torch"]
    assert report.machine_tag({"gpu": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert report.machine_tag({"cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu_count": 2}) == \
        "cpu-intel-xeon-platinum-8375c-2cpu"
    assert report.format_time(1.5e-5) == "15 us" and report.format_time(2.0) == "2 s"


def test_bench_subcommand_parses():
    from dymu.app.cli import build_parser

    args = build_parser().parse_args(["bench", "-k", "dtome", "--out", "x"])
    assert args.keyword == "dtome" and args.out == "x" and callable(args.func)
