"""Package-level behaviour: import, backend report, command line."""

import subprocess
import sys

import dymu_kernels as dk


def test_backend_info_reports_every_backend():
    info = dk.backend_info()
    assert set(info) == {"reference", "native", "triton"}
    assert info["reference"] == "available"
    assert info["native"] == "available", info["native"]


def test_python_m_dymu_kernels_prints_versions():
    out = subprocess.run([sys.executable, "-m", "dymu_kernels"], capture_output=True, text=True, check=True).stdout
    assert '"torch"' in out and '"backends"' in out and "TRITON_INTERPRET" in out


def test_dymu_help():
    out = subprocess.run([sys.executable, "-m", "dymu", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out


def test_library_imports_no_application_code():
    """``dymu`` (the library) never imports ``dymu.app`` (CLI, demo, assets, report), nor
    transformers until a model is used."""
    code = (
        "import sys, dymu, dymu.encoders, dymu.vtu_llm, dymu.vtu_inputs, dymu.calibration, dymu.merged_cache, "
        "dymu.vlm_patch; print(sorted(m for m in sys.modules if m.startswith('dymu.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
