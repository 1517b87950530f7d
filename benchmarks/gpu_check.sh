#!/usr/bin/env bash
# Everything a GPU can show, in one call (the device tool runs it in the repository root):
#   build from source against the machine's torch, the whole test suite natively (the Triton
#   kernels compiled for the GPU, not interpreted), the benchmark suites once, and the benchmark
#   table (float32 and bfloat16, launches per step) with JSON under $OUT.
# The GPU machine has torch 2.11+cu130, triton 3.6.0, pytest and pytest-benchmark, and no registry:
# nothing is installed from the network.  Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/spectral_ext_gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
cd /tmp   # import the installed package, not the source tree
python -c "import spectral_ext as se; print({k: (b.available, b.detail) for k, b in se.available_backends().items()})"
cd - > /dev/null
env -u TRITON_INTERPRET pytest tests benchmarks -p no:cacheprovider -q -rs --benchmark-disable \
  2>&1 | tee "$OUT/pytest.txt" | tail -25
env -u TRITON_INTERPRET python -P -c "import runpy, sys; sys.path.append('.'); runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)" \
  --devices cuda --dtype float32,bfloat16 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
