#!/usr/bin/env bash
# The one script for a lent GPU machine (H100/H200, torch 2.11 + CUDA 13, no
# network): build with all cores, run the CUDA tests, run the CUDA benchmark,
# and write everything under benchmarks/results/ and into OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: benchmarks/results)
#
# Sized to finish in under 8 minutes: build ~2 min, tests ~2 min, bench ~3 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
RES=benchmarks/results
mkdir -p "$OUT" "$RES"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
STAMP=$(date -u +%Y%m%d-%H%M%S)
LOG="$OUT/gpu-check-$STAMP.log"

{
  echo "== environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import json, torch; print(json.dumps({'torch': torch.__version__, \
'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), \
'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
  echo "== build"
  # Offline: nothing is fetched; the installed torch is the one built against.
  time $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
  $PY -c "import fusedrnn; print('backends', fusedrnn.backends())"
  echo "== tests"
  timeout 240 $PY -m pytest -q tests/test_cuda.py tests/test_ops.py tests/test_modules.py \
    --junitxml="$OUT/gpu-tests-$STAMP.xml"
  echo "tests exit code: $?"
  echo "== benchmark"
  timeout 240 $PY -m benchmarks.bench --device cuda --quick --out-dir "$OUT"
  echo "bench exit code: $?"
} 2>&1 | tee "$LOG"

# Keep a copy in the repo's results folder as well.
if [ "$(realpath "$OUT")" != "$(realpath "$RES")" ]; then
  cp "$OUT"/cuda-* "$OUT"/gpu-* "$RES"/ 2>/dev/null || true
fi
