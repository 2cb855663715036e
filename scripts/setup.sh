#!/usr/bin/env bash
# Installs what fusedrnn needs and builds fusedrnn._C in place (CPU kernels
# always; CUDA kernels when nvcc and a CUDA build of torch are present).
#
# An installed torch is kept and built against; without one, DEFAULT_TORCH
# below is installed. PYTHON selects the interpreter (default python3).
#
# Note [Build requirements in the user's environment]
# The build runs with --no-build-isolation (so that it compiles against the
# torch that is installed), which means nothing installs pyproject.toml's
# build requirements: they must already be in the environment. A stock venv
# has an old setuptools (Python 3.11: 65.5, without `bdist_wheel`) and no
# `wheel`, so requirements.txt asks for a setuptools that builds wheels on its
# own. Installed torch releases pin setuptools themselves (2.11: <82,
# 2.14: >=77.0.3), so the installed torch goes into the same pip call,
# pinned to its version: pip then picks a setuptools within torch's pins and
# leaves torch as it is.
#
# A build is kept when it is newer than every source under csrc/ and setup.py,
# was made against the same torch, and this environment imports it from here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEFAULT_TORCH=2.14.1
# torch first: the extension is compiled against whatever torch is installed.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==$DEFAULT_TORCH"
torch_version=$($PY -c "import importlib.metadata as m; print(m.version('torch'))")
$PY -m pip install -q -r requirements.txt "torch==$torch_version"

# What the build is made against: torch version and variant, and the interpreter.
against=$($PY -c "import sys, torch; print(f'torch {torch.__version__} \
({\"CUDA \" + torch.version.cuda if torch.version.cuda else \"CPU-only\"} build), \
Python {sys.version.split()[0]} ({sys.executable})')")
ext=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
so=fusedrnn/_C$ext
stamp=build/against${ext%.so}.txt
here=$(pwd -P)
# -I: import as this environment does anywhere, not the checkout in the current folder.
installed_here() {
  $PY -I -c "import os, sys, fusedrnn
sys.exit(os.path.dirname(os.path.realpath(fusedrnn.__file__)) != os.path.join(sys.argv[1], 'fusedrnn'))" \
    "$here" 2>/dev/null
}
if [ -f "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$against" ] && installed_here; then
  echo "fusedrnn._C is up to date ($so, built against $against)"
else
  echo "fusedrnn: building fusedrnn._C against $against"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e .
  mkdir -p build
  echo "$against" > "$stamp"
fi
$PY -c "import fusedrnn; print('fusedrnn backends:', fusedrnn.backends())"
