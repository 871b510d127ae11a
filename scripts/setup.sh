#!/usr/bin/env bash
# Creates .venv (once), installs what bnx needs, and builds the extension in place.
# CUDA kernels are built when torch has CUDA and nvcc is found (no GPU needed); BNX_CUDA=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch 2.14.1 is the version this project is tested with; any torch >= 2.11 builds it.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${BNX_TORCH_VERSION:-2.14.1}" numpy pytest ninja matplotlib setuptools
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
