#!/usr/bin/env bash
# The one script for a GPU machine (H100/H200, torch 2.11 + CUDA 13, no
# network): build with all cores, run the CUDA tests, run the CUDA benchmarks,
# and write everything under benchmarks/results/ and into OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: benchmarks/results)
#
# Sized to finish in under 7.5 minutes, so that 15 minutes on a GPU machine
# leave room for a second try: the build (~1.5 min on 16 cores), then stages with their
# own timeouts (355 s in all), most important first, so that a stage that
# times out leaves the later ones their time:
#   the persistent kernel's tests, with the largest layouts that fit (over
#   200 KB of shared memory: test_largest_layouts_cuda), and the CUDA-only
#   tests (each under every FUSEDRNN_ALGO); one persistent step's latency; the persistent set (T=100,
#   B 1..64, H 256..1024, float32 and bfloat16; it holds the fastrnns config)
#   with FUSEDRNN_ALGO=persistent (auto is step-wise until this kernel has GPU
#   results); the op and module tests on CUDA under
#   FUSEDRNN_ALGO=persistent; the float16 LSTM rows where torch.nn runs cuDNN's
#   own persistent kernel (--cudnn-persistent: cuDNN at its best), persistent;
#   the persistent set's table step-wise; the op tests step-wise,
#   with the regularised ops' CUDA tests. Last, only where a FlashRNN wheel was
#   carried in (wheels/flashrnn-*.whl; the machine has no network): FlashRNN's
#   README configuration against fusedrnn and cuDNN (benchmarks/flashrnn.py,
#   120 s more, most of it FlashRNN compiling its kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
RES=benchmarks/results
mkdir -p "$OUT" "$RES"
PY=${PYTHON:-python3}
# No OpenMP variable is set: the benchmarks measure the environment as it is.
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%d-%H%M%S)
LOG="$OUT/gpu-check-$STAMP.log"

stage() {  # stage NAME TIMEOUT_S CMD...: run, log its exit code, go on
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T))"
  timeout "$limit" "$@"
  echo "$name exit code: $?"
}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  $PY -c "import json, torch; p = torch.cuda.get_device_properties(0); \
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, \
'cudnn': torch.backends.cudnn.version(), 'gpu': p.name, 'sms': p.multi_processor_count, \
'tf32_matmul': torch.backends.cuda.matmul.allow_tf32}))"
  echo "== build"
  # Offline: nothing is fetched; the installed torch is the one built against.
  time $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  $PY -c "import fusedrnn; print('backends', fusedrnn.backends())"
  stage "persistent + cuda tests" 105 $PY -m pytest -q -rfE --maxfail=10 -k "cuda" \
    tests/test_persistent.py tests/test_cuda.py --junitxml="$OUT/gpu-tests-persistent-$STAMP.xml"
  stage "persistent step latency" 15 sh -c \
    "$PY -m benchmarks.floors --measure-barrier | tee '$OUT/persistent-step-latency.json'"
  stage "bench persistent set, persistent" 75 env FUSEDRNN_ALGO=persistent $PY -m benchmarks.bench \
    --device cuda --persistent --dtype float32,bfloat16 --no-plot --out-dir "$OUT/persistent-kernel"
  stage "op + module tests, persistent" 50 env FUSEDRNN_ALGO=persistent $PY -m pytest -q -rfE \
    -k "cuda" tests/test_ops.py tests/test_modules.py \
    --junitxml="$OUT/gpu-tests-persistent-ops-$STAMP.xml"
  stage "bench cuDNN-persistent set, persistent" 25 env FUSEDRNN_ALGO=persistent \
    $PY -m benchmarks.bench --cudnn-persistent --rounds 2 --no-plot \
    --out-dir "$OUT/cudnn-persistent"
  stage "bench persistent set, stepwise" 45 env FUSEDRNN_ALGO=stepwise $PY -m benchmarks.bench \
    --device cuda --persistent --dtype float32,bfloat16 --rounds 2 --no-plot \
    --out-dir "$OUT/persistent-stepwise"
  stage "op tests, stepwise; regularised ops" 40 env FUSEDRNN_ALGO=stepwise $PY -m pytest -q \
    -rfE -k "cuda" tests/test_ops.py tests/test_reg_ops.py \
    --junitxml="$OUT/gpu-tests-stepwise-ops-$STAMP.xml"
  for wheel in wheels/flashrnn-*.whl; do
    [ -e "$wheel" ] || continue
    $PY -m pip install -q --no-deps --no-index "$wheel" &&
      stage "FlashRNN's configuration" 120 $PY -m benchmarks.flashrnn --out-dir "$OUT"
  done
} 2>&1 | tee "$LOG"

# Keep a copy in the repo's results folder as well.
if [ "$(realpath "$OUT")" != "$(realpath "$RES")" ]; then
  cp -r "$OUT"/. "$RES"/ 2>/dev/null || true
fi
