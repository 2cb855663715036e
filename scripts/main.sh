#!/usr/bin/env bash
# README's main command: set-up (installs and builds fusedrnn in place), then
# the benchmark. Arguments go to benchmarks/bench.py: --quick (default), --full,
# --smoke (CI), --device, --dtype, --omp-passive, --markdown, --plot-only, ...
# (see --help). The benchmark runs in the environment this script is started
# in: it sets no OpenMP variable (benchmarks/environment.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m benchmarks.bench "$@"
