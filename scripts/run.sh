#!/usr/bin/env bash
# The main job: set up, then explain the train/eval gradient difference on a built-in CNN.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bnx explain "$@"
