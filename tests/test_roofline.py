"""benchmarks/roofline.py: the cost model's arithmetic, the model table, and the report's use of it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("bench_roofline", ROOT / "benchmarks" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dtome_ideal_bytes_and_flops(roofline):
    b, n, c, d = 2, 9, 4, 6
    cost = roofline.dtome_merge_cost(b, n, c, d, "fp16")
    # metric + x in + x out (2 B each), size in/out, lengths in/out, pos_map in/out, row_map
    assert cost.ideal_bytes == b * (n * c * 2 + 2 * n * d * 2 + 2 * n * 4 + 2 * 4 + 2 * n * 4 + n * 4)
    assert cost.flops == b * (2 * 5 * 4 * c + 3 * n * c + 3 * n * d)
    assert cost.kernel_bytes >= cost.ideal_bytes * 0.9 and not cost.tensor_cores


def test_vtu_flops_and_roofline(roofline):
    cost = roofline.vtu_attention_cost(1, 32, 32, 128, 640, 240, "bf16")
    assert cost.flops == pytest.approx(2 * 2 * 640 ** 2 * 128 * 32 / 2 + 6 * 640 * 128 * 64)
    assert cost.tensor_cores and cost.kernel_bytes > cost.ideal_bytes
    h100 = cost.roofline_s("H100")
    assert h100 == pytest.approx(max(cost.ideal_bytes / 3.35e12, cost.flops / 989e12))
    assert cost.roofline_s("A100") > h100 and cost.bound("H100") == "compute"
    # GQA sharing: a kernel reading K/V once per KV head moves fewer bytes than once per query head
    shared = roofline.vtu_attention_cost(1, 28, 4, 128, 3700, 1180)
    per_head = roofline.vtu_attention_cost(1, 28, 4, 128, 3700, 1180, kv_per_query_head=True)
    assert shared.ideal_bytes == per_head.ideal_bytes and shared.kernel_bytes < per_head.kernel_bytes


def test_model_table_covers_both_models(roofline):
    table = roofline.model_table()
    assert "Model, not measured" in table and "LLaVA-1.5" in table and "LLaVA-OV" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(roofline.MODEL_ROWS) + 1
    for gpu in ("H100", "H200", "A100"):
        assert f"{gpu} roofline" in table


def test_report_shows_roofline_beside_measured(roofline, tmp_path):
    from dymu.app.report import load_results, render_markdown

    cost = roofline.dtome_merge_cost(1, 577, 64, 1024, "fp32").as_dict()
    bench = lambda impl, median: {  # noqa: E731
        "name": f"test_dtome_merge[{impl}]", "group": "dtome_merge CLIP-L/14-336 B=1", "stats": {"median": median},
        "extra_info": {"impl": impl, "op": "dtome_merge", "shape": "CLIP-L/14-336 B=1", "roofline": cost},
    }
    data = {"machine_info": {"dymu": {"gpu": "NVIDIA H200", "tag": "nvidia-h200"}},
            "benchmarks": [bench("official-eager", 1e-3), bench("triton", 2e-5)]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    text = render_markdown(*load_results(path))
    assert "fractions on this H200" in text and "triton of roofline" in text
    seconds = max(cost["ideal_bytes"] / 4.8e12, cost["flops"] / 67e12)
    assert f"{100 * seconds / 2e-5:.3g}%" in text
    assert "model, not measured" in text
