#!/usr/bin/env bash
# Installs what fusedrnn needs and builds fusedrnn._C in place (CPU kernels
# always; CUDA kernels when nvcc and a CUDA build of torch are present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first: the extension is compiled against whatever torch is installed.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.14.1"
$PY -m pip install -q -r requirements.txt
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
$PY -c "import fusedrnn; print('fusedrnn backends:', fusedrnn.backends())"
