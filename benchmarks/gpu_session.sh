#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (it has its own torch/triton/transformers,
# Python 3.12 and no package registry):
#
#   here, once:  pip download --no-deps -d .gpu_wheels pytest pytest-benchmark hypothesis \
#                    iniconfig pluggy packaging py-cpuinfo sortedcontainers attrs
#   device run:  bash benchmarks/gpu_session.sh        (carry: [".gpu_wheels"])
#
# Builds csrc for this machine, runs the test suite on CUDA (slow real-weight tests skipped: their
# packages are not installed there), runs the benchmarks and renders the report into $OUT (or
# benchmarks/results/<gpu>/ when $OUT is unset). Prints the device name first.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
if [ -d .gpu_wheels ]; then python -m pip install -q --no-index --find-links .gpu_wheels pytest pytest-benchmark hypothesis; fi
python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python -m dymu_kernels
out="${OUT:-}"
# Each stage is time-boxed so the whole call fits one 10-minute device command.
timeout 300 python -m pytest -q tests -m "not slow" -p no:cacheprovider --maxfail=25 2>&1 | tail -40
timeout 200 python -m pytest -q benchmarks --benchmark-enable --benchmark-json="${out:-.}/gpu_benchmark.json" 2>&1 | tail -60
timeout 60 python benchmarks/memory.py --out "${out:-.}/vtu_memory.md" || true  # VTU peak memory per backend
python benchmarks/roofline.py --json "${out:-.}/gpu_benchmark.json" || true  # medians beside the roofline
python -m dymu bench --render "${out:-.}/gpu_benchmark.json" --out "${out:-benchmarks/results/gpu}" || true
