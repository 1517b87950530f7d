#!/usr/bin/env bash
# Everything a GPU can show.  Every call is self-contained: it builds from source against the
# machine's own torch (the CUDA kernels required), then runs the stages asked for, printing each
# stage's start time and the seconds since the call began:
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on a small CUDA workload that
#             checks every sigma, v and gradient (skipped, with the reason, where the sanitizer
#             refuses the device: gVisor machines), then natively a many-tile step repeated 300
#             times, bitwise equal each time (what racecheck cannot see: inter-block ordering);
#   test      the whole test suite natively (CUDA and Triton kernels on the GPU, launches counted
#             by torch.profiler, CUDA-graph replay) and the benchmark suites once;
#   bench     the benchmark table (float32 and bfloat16, launches per step, /floor) with JSON,
#             then reg.step() eager and graph-replayed (benchmarks/step_plan.py --device cuda).
# Everything goes to $OUT (the device tool brings it back).  The lent machine has torch
# 2.11+cu130, triton 3.6.0, pytest, pytest-benchmark, nvcc and compute-sanitizer, and no
# registry: nothing is installed from the network.
#
#   bash benchmarks/gpu_check.sh [STAGES]   STAGES: comma-separated subset of sanitize,test,bench
#                                           (default: all; "build" alone only builds)
# Measured on a lent H100 (2026-11-25, before the issue-13 fixes added the fuzzer and the
# 300-repeat stages): build 40 s, sanitize 45 s, test 210 s, bench 90 s.  The device tool allows
# 10 minutes per call and a machine stays warm ~30 s, so every call builds again, and the whole
# call (build included) is held to BUDGET seconds (default 540): each stage's timeout is cut to
# what is left, and a stage with under 30 s left is skipped and counted as a failure, so a call
# never runs past the tool's limit.  Suggested order (the suite matters most):
#   `make gpu-check STAGES=test`  then  `make gpu-check STAGES=sanitize,bench`.
set -uo pipefail
STAGES=",${1:-sanitize,test,bench},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
OUT=${OUT:-/tmp/spectral_ext_gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
# an inherited list with names ("Hopper", or the lent machine's "9.0a") would replace ours:
# always set it explicitly (the tests compare the build's list with this variable)
export TORCH_CUDA_ARCH_LIST="${SPECTRAL_EXT_ARCHS:-8.0;9.0+PTX}"
# The lent machine's CXX is /opt/gcc/bin/g++, a wrapper that links libstdc++ statically into
# the extension: that private copy's uninitialized locale crashed the first error message that
# formats a number (SIGSEGV in std::ostream::_M_insert<unsigned long> under check_inputs).  Build
# the extension and the tests' CUDA emulation with the system compiler, which links the
# libstdc++ torch uses.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${BUDGET:-540}
status=0
stage() { echo; echo "=== $* ($(date +%T), +$(( $(date +%s) - T0 )) s)"; }
# the timeout of the next command: its own limit ($1), cut to what is left of the call's budget
limit() {
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  echo $(( left < $1 ? left : $1 ))
}
# whether a stage may start: at least 30 s of the budget left (else skipped, and a failure)
room() {
  if [ "$(limit 30)" -lt 30 ]; then
    echo "SKIPPED: $1: under 30 s left of this call's BUDGET=$BUDGET s; run it in a call of its own"
    status=1
    return 1
  fi
}

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

stage "build (CXX=${CXX:-default}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
SPECTRAL_EXT_CUDA=1 MAX_JOBS=16 $PY -m pip install -v --disable-pip-version-check \
  --no-build-isolation --no-deps . > "$OUT/build.txt" 2>&1 \
  || { tail -40 "$OUT/build.txt"; echo "BUILD FAILED"; exit 1; }
grep -iE "warning" "$OUT/build.txt" | grep -viE "pip|setuptools|byte-compil" | head -20
(cd /tmp && $PY -c "import spectral_ext as se; from spectral_ext import _C
print('cuda runtime/driver/devices:', _C.cuda_runtime())
for k, b in se.available_backends().items(): print(f'{k:10s} {b.available!s:5s} {b.detail}')") \
  | tee "$OUT/backends.txt" || status=1

want sanitize && for tool in memcheck racecheck synccheck; do
  stage "compute-sanitizer --tool $tool"
  room "compute-sanitizer $tool" || break
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit "${SANITIZE_TIMEOUT:-150}")" compute-sanitizer \
    --tool "$tool" --error-exitcode 9 $PY -P benchmarks/sanitize_cuda.py \
    > "$OUT/sanitize_$tool.txt" 2>&1
  rc=$?; tail -6 "$OUT/sanitize_$tool.txt"
  if grep -qiE "device not supported|not supported on this (device|platform)" "$OUT/sanitize_$tool.txt"; then
    echo "SKIPPED: compute-sanitizer refuses this device (a gVisor machine); not a failure"
    break
  fi
  echo "exit $rc"; [ "$rc" = 0 ] || status=1
done
if want sanitize && room "300 repeats"; then
  stage "workload natively, and a many-tile step repeated 300 times"
  timeout "$(limit "${SANITIZE_TIMEOUT:-150}")" $PY -P benchmarks/sanitize_cuda.py --repeat 300 \
    --modes phases,persistent > "$OUT/repeat.txt" 2>&1
  rc=$?; tail -12 "$OUT/repeat.txt"; echo "exit $rc"; [ "$rc" = 0 ] || status=1
fi

if want test && room "test suite"; then
  stage "test suite (native)"
  env -u TRITON_INTERPRET timeout "$(limit "${TEST_TIMEOUT:-480}")" $PY -P -m pytest tests benchmarks \
    -p no:cacheprovider -q -rfs --benchmark-disable --durations=10 > "$OUT/pytest.txt" 2>&1
  rc=$?; grep -E "passed|failed|error|FAILED|SKIPPED" "$OUT/pytest.txt" | tail -40; echo "exit $rc"
  [ "$rc" = 0 ] || status=1
fi

if want bench && room "benchmark table"; then
  stage "benchmark table"
  env -u TRITON_INTERPRET timeout "$(limit "${BENCH_TIMEOUT:-420}")" $PY -P -c "import runpy, sys; sys.path.append('.'); runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)" \
    --devices cuda --dtype float32,bfloat16 --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  rc=$?; cat "$OUT/bench.txt"; echo "exit $rc"
  [ "$rc" = 0 ] || status=1
fi

if want bench && room "regularizer step"; then
  # reg.step() on 512 x 64x64: eager (the plan through plan_step) and graph-replayed, against the
  # floor and the naive loop (issue 14: <= 40 us eager, <= 20 us replayed)
  stage "regularizer step (benchmarks/step_plan.py --device cuda)"
  timeout "$(limit "${STEP_TIMEOUT:-120}")" $PY -P benchmarks/step_plan.py --device cuda --rounds 21 \
    > "$OUT/step_plan.txt" 2>&1
  rc=$?; cat "$OUT/step_plan.txt"; echo "exit $rc"
  [ "$rc" = 0 ] || status=1
fi
stage "done: gpu_check status $status"
exit $status
