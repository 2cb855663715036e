#!/usr/bin/env bash
# README's main command: set-up (installs and builds fusedrnn in place), then
# the benchmark. Arguments go to benchmarks/bench.py: --quick (default), --full,
# --smoke (CI), --device, --dtype, --markdown, --plot-only, ... (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Before torch loads: spin-waiting OpenMP threads wreck timings on a shared CPU.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "${PYTHON:-python3}" -m benchmarks.bench "$@"
