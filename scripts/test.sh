#!/usr/bin/env bash
# Set-up, then the test suite. CUDA tests run where a GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
${PYTHON:-python3} -m pytest -q -rfE tests "$@"
