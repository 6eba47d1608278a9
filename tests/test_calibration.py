"""Threshold calibration (paper eq. 4), the thresholds file, and calibration under torch.distributed."""

import json
import math
import socket

import pytest
import torch

import dymu
from dymu import DToMeEncoder, calibrate_thresholds, load_thresholds, save_thresholds

transformers = pytest.importorskip("transformers")

LAYERS = 3
CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=28,
    patch_size=7, attn_implementation="eager",
)


def _model():
    torch.manual_seed(7)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _batches(count=2, bsz=3):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(bsz, 3, 28, 28, generator=g) for _ in range(count)]


def test_one_batch_merges_r_per_image(model):
    (batch,) = _batches(1, bsz=4)
    r = 3
    cal = calibrate_thresholds(model, [batch], r, progress=False)
    assert len(cal) == LAYERS and cal.r_per_layer == [r] * LAYERS and cal.num_images == 4
    assert all(0.0 <= t <= 1.0 for t in cal.thresholds)
    # Applied to the batch it was calibrated on, layer 0 merges B*r tokens (strict test; the
    # edge that sits exactly at tau may go either way on another backend: +-1).
    out = DToMeEncoder(model, cal)(batch)
    n0 = out.pos_map.shape[1]
    merged_layer0 = int((n0 - out.layer_lengths[0]).sum())
    assert abs(merged_layer0 - 4 * r) <= 1


def test_per_layer_r_and_zero_layers(model):
    batches = _batches(2)
    cal = calibrate_thresholds(model, batches, [2, 0, 4], progress=False)
    assert math.isfinite(cal[0]) and cal[1] == math.inf and math.isfinite(cal[2])
    none = calibrate_thresholds(model, batches, 0, progress=False)
    assert none.thresholds == [math.inf] * LAYERS
    # batches may be dicts or tuples too
    again = calibrate_thresholds(model, [{"pixel_values": batches[0]}, (batches[1], None)], [2, 0, 4], progress=False)
    assert again.thresholds == cal.thresholds


def test_mean_over_batches(model):
    b0, b1 = _batches(2)
    t0 = calibrate_thresholds(model, [b0], 2, progress=False).thresholds
    t1 = calibrate_thresholds(model, [b1], 2, progress=False).thresholds
    both = calibrate_thresholds(model, [b0, b1], 2, progress=True)
    assert both.num_images == 6
    for a, b, m in zip(t0, t1, both.thresholds):
        assert m == pytest.approx((a + b) / 2, rel=1e-12, abs=1e-12)


def test_bad_r(model):
    with pytest.raises(ValueError, match=f"expected {LAYERS}, got 2"):
        calibrate_thresholds(model, _batches(1), [1, 2], progress=False)
    with pytest.raises(ValueError, match="int >= 0"):
        calibrate_thresholds(model, _batches(1), [1, -1, 2], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_thresholds(model, [], 2, progress=False)
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        calibrate_thresholds(torch.nn.Linear(2, 2), _batches(1), 2, progress=False)


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "thr.json"
    save_thresholds(path, [0.5, math.inf, 0.25], encoder_name="tiny-clip", r_per_layer=[2, 0, 3], num_images=12)
    data = json.loads(path.read_text())
    assert data["format"] == "dymu-thresholds" and data["thresholds"] == [0.5, None, 0.25]
    loaded = load_thresholds(path, num_layers=3)
    assert loaded.thresholds == [0.5, math.inf, 0.25] and loaded.r_per_layer == [2, 0, 3]
    assert loaded.num_images == 12 and loaded.encoder_name == "tiny-clip"
    with pytest.raises(ValueError, match="3 layers, but the encoder has 4 layers"):
        load_thresholds(path, num_layers=4)
    cal = dymu.CalibratedThresholds([0.1, 0.2, 0.3], [1, 1, 1], 5, "x")
    save_thresholds(path, cal, encoder_name="x")
    assert load_thresholds(path).r_per_layer == [1, 1, 1]
    with pytest.raises(ValueError, match="NaN"):
        save_thresholds(path, [0.1, float("nan")], encoder_name="x")
    bogus = tmp_path / "other.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a dymu thresholds file"):
        load_thresholds(bogus)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, state, batches, out_path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)).eval()
        model.load_state_dict(state)
        cal = calibrate_thresholds(model, batches[rank::world], [2, 0, 3], progress=False)
        torch.save({"thresholds": cal.thresholds, "num_images": cal.num_images}, f"{out_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_two_gloo_processes(model, tmp_path):
    """Two CPU processes each calibrate on their share; both get the single-process result."""
    batches = _batches(4, bsz=2)
    expected = calibrate_thresholds(model, batches, [2, 0, 3], progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # fork: the children inherit the imported torch/transformers (spawn re-imports them, about
    # 10 s of CPU per child); they run single-threaded, which keeps OpenMP fork-safe.
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(
        _worker, args=(2, _free_port(), state, batches, str(tmp_path / "res")), nprocs=2, join=True,
        start_method=method,
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"res.{rank}")
        assert got["num_images"] == 8
        for g, e in zip(got["thresholds"], expected.thresholds):
            assert g == pytest.approx(e, rel=1e-6, abs=1e-7)


def test_cli_calibrate_local_folder(model, tmp_path, capsys):
    from PIL import Image

    from dymu.app.cli import main

    model.save_pretrained(tmp_path / "tiny-clip")
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        pixels = (torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"im{i}.png")
    out = tmp_path / "thr.json"
    argv = ["calibrate", "--model", str(tmp_path / "tiny-clip"), "--images", str(images), "--r", "2,0,1",
            "--output", str(out), "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    loaded = load_thresholds(out, num_layers=LAYERS)
    assert loaded.num_images == 3 and loaded.r_per_layer == [2, 0, 1] and loaded.thresholds[1] == math.inf
    assert "wrote" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(tmp_path / "missing"), "--r", "2", "--output", str(out)]) == 2
    assert "local HF model folder" in capsys.readouterr().err
