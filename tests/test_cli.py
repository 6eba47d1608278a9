"""The command lines as a user meets them: bad arguments, failures, and files written whole.

Every bad argument must print one line (what is wrong, how to fix it) on stderr, exit with
status 2, show no traceback and write no file, and be found before any model is loaded: the
model folders here are tiny fakes holding only a config.json (loading one would fail with a
different message), and DYMU_CACHE points at a folder that must stay absent (the bundled
DINOv2 would be converted into it).
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TINY_CLIP = {  # 64 px / patch 16 -> 16 patches + CLS = 17 tokens, 3 layers
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_hidden_layers": 3, "image_size": 64, "patch_size": 16,
}


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DYMU_DEBUG", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python_api")])
    env["DYMU_CACHE"] = str(tmp_path / "cache")  # must never be created: no model is loaded
    env.update(extra)
    return env


def _files(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def _run(tmp_path, module, args, **env):
    work = tmp_path / "work"  # the current folder: default outputs (out/demo, ...) would land here
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=work, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def place(tmp_path):
    """tmp_path with the fake inputs the cases refer to, as {name: path}."""
    def folder(name, config=None, text=None):
        path = tmp_path / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        if text is not None:
            (path / "config.json").write_text(text)
        return str(path)

    from PIL import Image

    (tmp_path / "work").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (120, 30, 200)).save(images / "a.png")
    broken = tmp_path / "broken_images"
    broken.mkdir()
    (broken / "b.png").write_bytes(b"not a png")
    (tmp_path / "a_file.txt").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "not_bench.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": []}))
    return {
        "tmp": str(tmp_path),
        "out": str(tmp_path / "thr.json"),
        "missing": str(tmp_path / "missing"),
        "clip": folder("tiny_clip", TINY_CLIP),
        "siglip": folder("siglip", {"model_type": "siglip", "vision_config": {"num_hidden_layers": 2, "patch_size": 14}}),
        "dinov2": folder("dinov2", {"model_type": "dinov2"}),  # every value at transformers' default
        "llama": folder("llama", {"model_type": "llama"}),
        "registers": folder("registers", {"model_type": "dinov2_with_registers"}),
        "no_config": folder("no_config"),
        "bad_config": folder("bad_config", text="{oops"),
        "images": str(images),
        "empty_images": folder("empty_images"),
        "broken_images": str(broken),
        "a_file": str(tmp_path / "a_file.txt"),
        "bad_json": str(tmp_path / "bad.json"),
        "not_bench": str(tmp_path / "not_bench.json"),
        "bench": str(tmp_path / "bench.json"),
    }


def _calibrate(*extra, model="dinov2-s14", r="2", output="{out}"):
    args = ["calibrate", "--model", model, "--output", output, "--no-progress", *extra]
    return args + (["--r", r] if r is not None else [])


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

BAD_ARGUMENTS = [
    # dymu calibrate
    ("output-folder-missing", _calibrate(output="{missing}/t.json"), "does not exist; create it first"),
    ("output-empty", _calibrate(output=""), "--output is empty"),
    ("output-is-folder", _calibrate(output="{tmp}"), "is a folder: give a file name"),
    ("r-count", _calibrate(r="1,2"), "--r has 2 values but the model has 12 layers"),
    ("r-count-folder", _calibrate(model="{clip}", r="1,2,3,4"), "--r has 4 values but the model has 3 layers"),
    ("r-negative", _calibrate(r="-1"), "must be >= 0"),
    ("r-negative-in-list", _calibrate(r="1,-2,3"), "must be >= 0"),
    ("r-not-int", _calibrate(r="abc"), "--r must be an int or comma-separated ints"),
    ("r-missing", _calibrate(r=None), "the following arguments are required: --r"),
    ("r-too-many", _calibrate(r="500"), "can merge at most 128 there (257 tokens at 224 px)"),
    ("r-too-many-later", _calibrate(model="{clip}", r="5"), "asks layer 2 to merge 5 tokens per image, but it can merge at most 3"),
    ("batch-size-0", _calibrate("--batch-size", "0"), "--batch-size must be a positive int, got 0"),
    ("batch-size-negative", _calibrate("--batch-size", "-3"), "--batch-size must be a positive int"),
    ("batch-size-not-int", _calibrate("--batch-size", "x"), "argument --batch-size: invalid int value"),
    ("image-size", _calibrate("--image-size", "225"), "--image-size 225 is not a multiple of the model's patch size 14; use e.g. 224 or 238"),
    ("image-size-folder", _calibrate("--image-size", "50", model="{clip}", r="1"), "patch size 16"),
    ("r-count-nested-config", _calibrate(model="{siglip}", r="1,2,3"), "--r has 3 values but the model has 2 layers"),
    ("image-size-default-config", _calibrate("--image-size", "100", model="{dinov2}"), "patch size 14; use e.g. 98 or 112"),
    ("image-size-0", _calibrate("--image-size", "0"), "--image-size 0 is not a multiple"),
    pytest.param("device-cuda", _calibrate("--device", "cuda"), "--device cuda: ", marks=NO_CUDA),
    ("device-bogus", _calibrate("--device", "gpu0"), "is not a torch device"),
    ("model-unsupported", _calibrate(model="{llama}"), "holds a 'llama' model; dymu calibrate supports CLIP, SigLIP and DINOv2"),
    ("model-registers", _calibrate(model="{registers}"), "holds a 'dinov2_with_registers' model"),
    ("model-no-config", _calibrate(model="{no_config}"), "has no config.json"),
    ("model-bad-config", _calibrate(model="{bad_config}"), "is not valid JSON"),
    ("model-missing", _calibrate(model="{missing}"), "is neither a local HF model folder"),
    ("images-missing", _calibrate("--images", "{missing}"), "is not a folder"),
    ("images-is-file", _calibrate("--images", "{a_file}"), "is not a folder"),
    ("images-empty", _calibrate("--images", "{empty_images}"), "holds no images"),
    ("images-unreadable", _calibrate("--images", "{broken_images}", model="{clip}", r="1"), "cannot read"),
    # dymu opdemo
    pytest.param("opdemo-cuda", ["opdemo", "--device", "cuda"], "--device cuda: ", marks=NO_CUDA),
    ("opdemo-bogus-device", ["opdemo", "--device", "nonsense"], "is not a torch device"),
    ("opdemo-cuda-index", ["opdemo", "--device", "cuda:99"], "--device cuda:99"),
    # dymu bench
    ("bench-render-missing", ["bench", "--render", "{missing}.json"], "does not exist"),
    ("bench-render-folder", ["bench", "--render", "{tmp}"], "is not a file"),
    ("bench-render-bad-json", ["bench", "--render", "{bad_json}"], "is not a pytest-benchmark JSON file"),
    ("bench-render-not-bench", ["bench", "--render", "{not_bench}"], "no \"benchmarks\" list"),
    ("bench-out-is-file", ["bench", "--render", "{bench}", "--out", "{a_file}"], "is a file, not a folder"),
    # dymu demo
    ("demo-photos", ["demo", "--photos", "rocket,unicorn"], "--photos: unknown 'unicorn'; choose among"),
    ("demo-settings", ["demo", "--settings", "low,max"], "--settings: unknown 'max'; choose among low,mid,high"),
    ("demo-out-is-file", ["demo", "--out", "{a_file}"], "is a file, not a folder"),
    ("demo-out-under-file", ["demo", "--out", "{a_file}/sub"], "cannot be created"),
    # the parsers themselves
    ("unknown-command", ["calibrat"], "invalid choice: 'calibrat'"),
    ("unknown-option", ["opdemo", "--devise", "cpu"], "unrecognized arguments: --devise"),
]


def _case(case):
    """("id", args, fragment) or pytest.param("id", args, fragment, marks=...) -> a param with that id."""
    if not hasattr(case, "marks"):  # a plain tuple (a pytest.param is a named tuple with marks)
        return pytest.param(*case[1:], id=case[0])
    return pytest.param(*case.values[1:], marks=case.marks, id=case.values[0])


@pytest.mark.parametrize("args,fragment", [_case(c) for c in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_and_exit_2(place, tmp_path, args, fragment):
    args = [a.format(**place) for a in args]
    before = _files(tmp_path)
    result = _run(tmp_path, "dymu", args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dymu"), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert _files(tmp_path) == before  # nothing written: no output, no cache, no temporary file


def test_python_m_dymu_kernels_parser(tmp_path):
    result = _run(tmp_path, "dymu_kernels", ["--help"])
    assert result.returncode == 0 and "usage: python -m dymu_kernels" in result.stdout
    assert '"backends"' not in result.stdout  # --help is honoured, not ignored
    result = _run(tmp_path, "dymu_kernels", ["--bogus"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "python -m dymu_kernels: error: unrecognized arguments: --bogus (see `python -m dymu_kernels --help`)"]
    # without arguments it prints the environment JSON, as before (tests/test_package.py)


def test_failure_after_the_checks_is_one_line_exit_1(tmp_path):
    """Arguments that pass the checks, then a failure while working: one line, exit 1."""
    (tmp_path / "work").mkdir()
    (tmp_path / "odd.json").write_text(json.dumps({"benchmarks": [{"name": "no stats"}]}))
    args = ["bench", "--render", str(tmp_path / "odd.json")]
    before = _files(tmp_path)
    result = _run(tmp_path, "dymu", args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dymu bench: failed: KeyError") and "--debug" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert _files(tmp_path) == before
    for debug in (["--debug"], []):  # --debug or DYMU_DEBUG=1 show the traceback
        shown = _run(tmp_path, "dymu", args + debug, **({} if debug else {"DYMU_DEBUG": "1"}))
        assert shown.returncode == 1 and "Traceback" in shown.stderr


def test_check_r_allows_exactly_what_a_layer_can_merge():
    from dymu.app.cli import BUNDLED, CLIError, ModelFacts, check_r

    dinov2 = BUNDLED["dinov2-s14"]
    check_r(128, ModelFacts("dinov2", 1, 14, 224, True), 224)  # 257 tokens: 128 sources, all may merge
    with pytest.raises(CLIError, match="at most 128"):
        check_r(129, ModelFacts("dinov2", 1, 14, 224, True), 224)
    check_r([128] + [0] * 11, dinov2, 224)
    with pytest.raises(CLIError, match="layer 1 to merge 65"):
        check_r([128, 65] + [0] * 10, dinov2, 224)  # 129 tokens left, CLS protected: 64 can merge
    check_r(14, dinov2, 224)  # the shipped setting's scale
    check_r(8, ModelFacts("siglip", 1, 16, 64, False), 64)  # no CLS: 16 tokens, 8 sources


# ---- files are written whole ---------------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from dymu._atomic import atomic_write, write_bytes, write_text

    path = tmp_path / "f.txt"
    write_text(path, "old\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write("half of the new conten")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f.txt"]  # the temporary file is gone
    write_bytes(tmp_path / "g.bin", b"\x00\x01")
    assert (tmp_path / "g.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError):
        with atomic_write(path, "a"):
            pass


def test_save_thresholds_and_report_leave_no_temporary_files(tmp_path):
    from dymu.app import report
    from dymu.calibration import load_thresholds, save_thresholds

    save_thresholds(tmp_path / "t.json", [0.5, float("inf")], encoder_name="x", r_per_layer=[1, 0], num_images=2)
    assert load_thresholds(tmp_path / "t.json").thresholds == [0.5, float("inf")]
    data = {"machine_info": {}, "benchmarks": [{"name": "a", "group": "s", "stats": {"median": 1e-3, "iqr": 0.0},
                                                "extra_info": {"impl": "native", "op": "op", "shape": "s"}}]}
    (tmp_path / "bench.json").write_text(json.dumps(data))
    paths = report.render_report(tmp_path / "bench.json", tmp_path / "report")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "op" in paths["markdown"].read_text()
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "report", "t.json"]
    assert sorted(os.listdir(tmp_path / "report")) == ["report.md", "report.png"]


def test_run_bench_writes_benchmark_json_whole(tmp_path):
    from dymu.app import report

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "test_tiny.py").write_text(
        "def test_tiny(benchmark):\n"
        "    benchmark.group = 'tiny'\n"
        "    benchmark.extra_info.update(impl='native', op='noop', shape='tiny')\n"
        "    benchmark.pedantic(lambda: None, rounds=2, iterations=1)\n")
    out = tmp_path / "out"
    assert report.run_bench(out_dir=out, bench_dir=bench) == 0
    assert sorted(os.listdir(out)) == ["benchmark.json", "report.md", "report.png"]
    assert json.loads((out / "benchmark.json").read_text())["machine_info"]["dymu"]["tag"]


def test_save_grid_writes_the_picture_whole(tmp_path):
    import numpy as np

    from dymu.app.visualize import group_image, save_grid

    image = np.full((28, 28, 3), 100, dtype=np.uint8)
    painted = group_image(image, torch.tensor([0, 0, 1, 1]), 2)
    path = save_grid([("photo", [("a", image), ("b", painted)])], str(tmp_path / "grid.png"), title="t")
    assert open(path, "rb").read(4) == b"\x89PNG"
    assert os.listdir(tmp_path) == ["grid.png"]


def test_main_in_process_exit_codes(monkeypatch, capsys):
    """main() returns the status (2 bad argument, 1 failure, 130 Ctrl-C) instead of raising."""
    from dymu.app import cli

    assert cli.main(["calibrate", "--model", "dinov2-s14", "--r", "2", "--output", "t.json", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "dymu calibrate: error: --batch-size must be a positive int, got 0\n"

    def interrupted(args):
        raise KeyboardInterrupt

    def broken(args):
        raise RuntimeError("disk on fire\nsecond line")

    parser = cli.build_parser

    def patched(func):
        def build():
            p = parser()
            for action in p._subparsers._group_actions:
                action.choices["info"].set_defaults(func=func)
            return p
        return build

    monkeypatch.delenv("DYMU_DEBUG", raising=False)
    monkeypatch.setattr(cli, "build_parser", patched(interrupted))
    assert cli.main(["info"]) == 130 and capsys.readouterr().err == "dymu info: interrupted\n"
    monkeypatch.setattr(cli, "build_parser", patched(broken))
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err.startswith("dymu info: failed: RuntimeError: disk on fire second line (rerun with --debug")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["info", "--debug"])
