#!/usr/bin/env bash
# Installs what fusedrnn needs and builds fusedrnn._C in place (CPU kernels
# always; CUDA kernels when nvcc and a CUDA build of torch are present).
# A build newer than every source under csrc/ and setup.py is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first: the extension is compiled against whatever torch is installed.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.14.1"
$PY -m pip install -q -r requirements.txt
so=$(ls fusedrnn/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ] \
    && $PY -c "import fusedrnn" 2>/dev/null; then
  echo "fusedrnn._C is up to date ($so)"
else
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
fi
$PY -c "import fusedrnn; print('fusedrnn backends:', fusedrnn.backends())"
