#!/usr/bin/env bash
# Tests under AddressSanitizer and UndefinedBehaviorSanitizer: an access outside a tensor or buffer, or a signed
# overflow, aborts the run with the sanitizer's report, even where every value comes out right.
#   bash scripts/sanitize.sh cpu [pytest args]        the CPU suite against a copy of bnx built with both
#                                                     sanitizers (CPU-only, in build/sanitize)
#   bash scripts/sanitize.sh emulation [pytest args]  tests/test_cuda_emulation.py with the emulated CUDA kernels
#                                                     built with both (BNX_EMULATION_SANITIZE)
# tests/test_sanitizers.py runs both, so the README's test command (and CI) does.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true
PY=$(command -v "${PYTHON:-.venv/bin/python}")
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, not resolved (a venv's python is a link)
CXX=${CXX:-c++}
asan=$("$CXX" -print-file-name=libasan.so)
libstdcxx=$("$CXX" -print-file-name=libstdc++.so)
if [[ "$asan" != /* || ! -e "$asan" ]]; then echo "sanitize: $CXX has no AddressSanitizer runtime"; exit 77; fi
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# The runtime must be loaded first, and libstdc++ with it (or ASan cannot find the real __cxa_throw).
# BNX_SANITIZED keeps tests/test_sanitizers.py from starting itself again inside the run.
export LD_PRELOAD="$asan $libstdcxx" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 BNX_SANITIZED=1
# pytest -s: a report goes to stderr as the process dies, which pytest's capture would lose.
case "$mode" in
  cpu)
    dir=build/sanitize
    rm -rf "$dir/bnx" "$dir/tests" "$dir/csrc"
    mkdir -p "$dir"
    cp -r bnx tests csrc setup.py "$dir/"
    rm -f "$dir"/bnx/_C*.so
    # The build itself runs without the preloaded runtime.
    (cd "$dir" && LD_PRELOAD= CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" BNX_CUDA=0 \
      MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace > build.log 2>&1) \
      || { tail -n 30 "$dir/build.log"; exit 1; }
    cd "$dir"
    # Left out: the emulation tests (the other mode), the CLI tests (their subprocesses load cuDNN, which
    # fails under the preloaded runtime) and this script's own tests.
    exec "$PY" -m pytest tests -q -s -p no:cacheprovider --ignore tests/test_cuda_emulation.py \
      --ignore tests/test_cli.py --ignore tests/test_sanitizers.py "$@"
    ;;
  emulation)
    BNX_EMULATION_SANITIZE=address,undefined exec "$PY" -m pytest tests/test_cuda_emulation.py -q -s \
      -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: bash scripts/sanitize.sh cpu|emulation [pytest args]"; exit 2 ;;
esac
