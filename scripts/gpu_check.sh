#!/usr/bin/env bash
# The one script for the GPU machine: builds bnx for sm_90, runs the CUDA tests, the CLI on CUDA and the
# benchmark, and leaves its logs and results in $OUT (./out when OUT is unset).
#   OUT=... bash scripts/gpu_check.sh [bench options...]
# Without a GPU it builds nothing and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible; nothing to do" | tee "$OUT/env.txt"
  exit 0
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BNX_CUDA=1 \
  timeout 400 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
if [ $rc -ne 0 ]; then grep -E "error" "$OUT/build.log" | head -30; exit 1; fi
"$PY" -c "import bnx; assert bnx.has_cuda_kernels(), 'CUDA kernels missing'; print('bnx CUDA kernels: yes')" || exit 1

echo "== CUDA tests"
BNX_LARGE_TESTS=${BNX_LARGE_TESTS:-1} timeout ${TEST_TIMEOUT:-240} "$PY" -m pytest tests -q -rs -k "cuda" -p no:cacheprovider \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -n 25 "$OUT/tests.log"

echo "== CLI on CUDA"
{
  timeout 60 "$PY" -m bnx explain --device cuda; echo "explain rc=$?"
  timeout 120 "$PY" -m bnx check --device cuda; echo "check rc=$?"
} > "$OUT/cli.log" 2>&1
grep -E "rc=|FAIL|max abs" "$OUT/cli.log" | tail -n 15

echo "== benchmark"
timeout ${BENCH_TIMEOUT:-300} "$PY" -m bnx bench --device cuda --json "$OUT/bench.json" --md "$OUT/bench.md" \
  --plot "$OUT/bench.png" "$@" 2> "$OUT/bench-progress.log"
echo "bench rc=$?"
