"""The main job end to end on a small subset of the bundled photos (real weights)."""

import os

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    from dymu.app.demo import run

    result = run(out_dir=str(tmp_path), photo_names=["rocket", "coins"], settings=["low", "high"], timing=False)
    assert os.path.getsize(result["grid"]) > 10_000
    report = open(result["report"]).read()
    assert "Tokens kept per photo" in report and "Fidelity" in report
    kept = result["kept"]
    # the busy photo keeps more tokens than the simple one, and 'high' keeps more than 'low'
    assert kept["low"][1] > kept["low"][0] and kept["high"][1] > kept["high"][0]
    assert all(h > l for h, l in zip(kept["high"], kept["low"]))
    assert set(result["answers"]) == {"full", "low", "high"}  # the VLM's own generate, per setting
    fidelity = result["fidelity"]["high"]
    assert fidelity.cos_vtu > 0.9 and fidelity.kl_vtu < fidelity.kl_novtu


def test_shipped_thresholds_load():
    from dymu.calibration import load_thresholds
    from dymu.app.demo import SETTINGS, thresholds_path

    for setting in SETTINGS:
        th = load_thresholds(thresholds_path(setting), num_layers=12)
        assert len(th) == 12 and th.num_images == 13
        assert all(0.0 <= t < 1.0 for t in th)
