#!/usr/bin/env bash
# Everything a GPU can show, in one call (the device tool runs it in the repository root):
#   1. build from source against the machine's torch, with the CUDA kernels required
#      (SPECTRAL_EXT_CUDA=1, default TORCH_CUDA_ARCH_LIST 8.0;9.0+PTX);
#   2. compute-sanitizer memcheck, racecheck and synccheck on a small CUDA workload;
#   3. the whole test suite natively (CUDA and Triton kernels on the GPU, launches counted by
#      torch.profiler, CUDA-graph replay), the benchmark suites once;
#   4. the benchmark table (float32 and bfloat16, launches per step, /floor) with JSON.
# Everything goes to $OUT (the device tool brings it back).  The GPU machine has torch 2.11+cu130,
# triton 3.6.0, pytest, pytest-benchmark, nvcc and compute-sanitizer, and no registry: nothing is
# installed from the network.
#   bash benchmarks/gpu_check.sh [STAGES]     STAGES: comma-separated subset of
#                                             build,sanitize,test,bench (default: all of them)
# The device tool allows 10 minutes per call: there, run "build,sanitize,test" and then "bench"
# (the build stays on a warm machine), e.g. `bash benchmarks/gpu_check.sh bench`.
set -uo pipefail
STAGES=",${1:-build,sanitize,test,bench},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
OUT=${OUT:-/tmp/spectral_ext_gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
status=0
stage() { echo; echo "=== $* ($(date +%T))"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if want build; then
stage "build"
SPECTRAL_EXT_CUDA=1 MAX_JOBS=16 python -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; echo "BUILD FAILED"; exit 1; }
grep -E "nvcc|warning" "$OUT/build.txt" | head -20
(cd /tmp && python -c "import spectral_ext as se; from spectral_ext import _C
print('cuda runtime/driver/devices:', _C.cuda_runtime())
for k, b in se.available_backends().items(): print(f'{k:10s} {b.available!s:5s} {b.detail}')") \
  | tee "$OUT/backends.txt"
fi

want sanitize && for tool in memcheck racecheck synccheck; do
  stage "compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python -P benchmarks/sanitize_cuda.py > "$OUT/sanitize_$tool.txt" 2>&1
  rc=$?; tail -6 "$OUT/sanitize_$tool.txt"; echo "exit $rc"
  [ "$rc" = 0 ] || status=1
done

if want test; then
stage "test suite (native)"
env -u TRITON_INTERPRET timeout 360 pytest tests benchmarks -p no:cacheprovider -q -rs \
  --benchmark-disable --durations=10 > "$OUT/pytest.txt" 2>&1
rc=$?; grep -E "passed|failed|error|FAILED|SKIPPED" "$OUT/pytest.txt" | tail -40; echo "exit $rc"
[ "$rc" = 0 ] || status=1
fi

if want bench; then
  stage "benchmark table"
  env -u TRITON_INTERPRET timeout 540 python -P -c "import runpy, sys; sys.path.append('.'); runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)" \
    --devices cuda --dtype float32,bfloat16 --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  rc=$?; cat "$OUT/bench.txt"; echo "exit $rc"
  [ "$rc" = 0 ] || status=1
fi
echo "gpu_check status: $status"
exit $status
