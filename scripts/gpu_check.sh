#!/usr/bin/env bash
# The one script for the GPU machine. Stages (default: all, in this order):
#   build  - build bnx for sm_90 with the CUDA kernels (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)
#   tests  - every CUDA test case (pytest -k cuda), compile tests last, large (>2^31 elements) included
#   cli    - python -m bnx explain / check on CUDA
#   bench  - the benchmark; arguments after "--" go to it; then benchmarks/ceilings.py on its JSON
#   groups - the training passes with each walk switch off and on (BNX_CUDA_PLANE_GROUPS, BNX_CUDA_L2_GROUPS,
#            BNX_CUDA_PDL, BNX_CUDA_ON_CHIP)
#   plans  - other launch-plan sizes of the sums and map kernels against the defaults (BNX_CUDA_SUMS_PLAN,
#            BNX_CUDA_MAP_PLAN; not in the default stages), compared case by case by benchmarks/compare_runs.py
#   ncu    - Nsight Compute on a few training cases: each kernel's time, DRAM bytes and L2 hit rate, with the L2
#            state each kernel finds (application replay, no cache flush), summarized by benchmarks/ncu_summary.py
#            (not in the default stages)
#   sanitize - compute-sanitizer memcheck and racecheck on the fused passes (small shapes; not in the default
#            stages: it costs device time; the GPU counterpart of scripts/sanitize.sh)
# Logs and results go to $OUT (./out when OUT is unset). Without a GPU it says so and does nothing.
#   OUT=... bash scripts/gpu_check.sh build tests cli
#   OUT=... bash scripts/gpu_check.sh bench -- --compile-budget 90
# BUDGET_S caps the whole run: each stage's timeout is cut to the seconds left, and a stage with less than
# 20 s left is skipped (device time is counted per session). PACK=FILE.tgz packs $OUT into one archive after
# every stage, so that a run stopped later still returns what it had (the device tool returns 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-100000} ))

# The smaller of a stage's own timeout and the seconds left before BUDGET_S runs out.
# (At least 1: "timeout 0" would mean no limit.)
cap() {
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
[ -n "${PACK:-}" ] && trap 'tar czf "$PACK" -C "$OUT" .' EXIT

stages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do stages+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#stages[@]} -eq 0 ] && stages=(build tests cli bench)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible; nothing to do" | tee "$OUT/env.txt"
  exit 0
fi

run_build() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs')"
    echo "cpus: $(nproc)"
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  local start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BNX_CUDA=1 \
    timeout "$(cap 300)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  local rc=$?
  echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
  if [ $rc -ne 0 ]; then grep -E "error" "$OUT/build.log" | head -30; exit 1; fi
  "$PY" -c "import bnx; assert bnx.has_cuda_kernels(), 'CUDA kernels missing'; print('bnx CUDA kernels: yes')" || exit 1
}

run_tests() {
  local start=$(date +%s)
  local workers=""
  "$PY" -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-8}"
  # SIGINT on timeout: pytest still prints what ran.
  BNX_LARGE_TESTS=${BNX_LARGE_TESTS:-1} timeout -s INT -k 10 "$(cap ${TEST_TIMEOUT:-170})" "$PY" -m pytest tests -q -rfEs $workers \
    -k "cuda and not compile and not emulation and not sanitizers" -p no:cacheprovider > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.log"
  tail -n 15 "$OUT/tests.log"
  # COMPILE_TEST_TIMEOUT=0 skips the torch.compile tests (about two minutes of device time).
  [ "${COMPILE_TEST_TIMEOUT:-120}" = "0" ] && { echo "compile tests skipped"; return; }
  timeout -s INT -k 10 "$(cap ${COMPILE_TEST_TIMEOUT:-120})" "$PY" -m pytest tests -q -rfEs -k "cuda and compile" \
    -p no:cacheprovider > "$OUT/tests-compile.log" 2>&1
  echo "compile tests rc=$?" | tee -a "$OUT/tests-compile.log"
  tail -n 5 "$OUT/tests-compile.log"
}

run_cli() {
  {
    timeout 60 "$PY" -m bnx explain --device cuda; echo "explain rc=$?"
    timeout 90 "$PY" -m bnx check --device cuda; echo "check rc=$?"
  } > "$OUT/cli.log" 2>&1
  grep -E "rc=|FAIL|max abs" "$OUT/cli.log" | tail -n 15
}

run_bench() {
  local start=$(date +%s)
  timeout -s INT -k 10 "$(cap ${BENCH_TIMEOUT:-420})" "$PY" -m bnx bench --device cuda --json "$OUT/bench.json" \
    --md "$OUT/bench.md" --plot "$OUT/bench.png" "$@" 2> "$OUT/bench-progress.log" | tee "$OUT/bench-summary.txt"
  echo "bench rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
  # The DRAM-traffic ceilings of the training cases and the targets at them (host only, a second or two).
  [ -s "$OUT/bench.json" ] && "$PY" benchmarks/ceilings.py "$OUT/bench.json" --md "$OUT/bench-ceilings.md" \
    > /dev/null 2> "$OUT/bench-ceilings.err" && tail -n 12 "$OUT/bench-ceilings.md"
  return 0
}

run_groups() {
  # Each walk switch against the defaults on the training passes, same machine, native in every run:
  # config "PL[B[D[O]]]" sets BNX_CUDA_PLANE_GROUPS=P, BNX_CUDA_L2_GROUPS=L (a: auto), BNX_CUDA_L2_GROUPS_BARRIERS=B,
  # BNX_CUDA_PDL=D and BNX_CUDA_ON_CHIP=O (GROUPS_CONFIGS, default "10 110 1a 1001 10001": the defaults; the
  # L2-grouped launch without grid barriers (per-column counts, any layout) everywhere; the same only where it buys
  # L2 reuse (auto); the defaults with programmatic dependent launches (B is unused without L2 groups); the
  # on-chip launch wherever the input fits in shared memory, or partly fits with the rest in half the L2 (the
  # launch-bound shape). Also: "11": one barrier per group in NCHW; "112": two barriers per group everywhere;
  # "00": plane groups off). The grouped launch narrows channels-last columns to fit in L2, down to
  # BNX_CUDA_L2_GROUP_ROW_BYTES (default 64) bytes of every row; set it in the environment to compare floors.
  local cfg l2 files=()
  for cfg in ${GROUPS_CONFIGS:-10 110 1a 1001 10001}; do
    l2=${cfg:1:1}
    [ "$l2" = a ] && l2=auto
    BNX_CUDA_PLANE_GROUPS=${cfg:0:1} BNX_CUDA_L2_GROUPS=$l2 BNX_CUDA_L2_GROUPS_BARRIERS=${cfg:2:1} BNX_CUDA_PDL=${cfg:3:1} \
      BNX_CUDA_ON_CHIP=${cfg:4:1} \
      timeout -s INT -k 10 "$(cap ${GROUPS_TIMEOUT:-200})" \
      "$PY" -m bnx bench --device cuda --shapes "${GROUPS_SHAPES:-gpu}" --passes "${GROUPS_PASSES:-train_fwd,train_bwd,train_fwd_bwd}" \
      --peers native --json "$OUT/groups-$cfg.json" --md "$OUT/groups-$cfg.md" 2> "$OUT/groups-$cfg-progress.log" \
      | tee "$OUT/groups-$cfg-summary.txt" | head -n 20
    echo "groups $cfg rc=${PIPESTATUS[0]}"
    [ -f "$OUT/groups-$cfg.json" ] && files+=("$OUT/groups-$cfg.json")
  done
  # Case by case against the first configuration (the defaults), one table.
  [ ${#files[@]} -ge 2 ] && "$PY" benchmarks/compare_runs.py "${files[@]}" --md "$OUT/groups.md" | tail -n 40
  return 0
}

run_plans() {
  # PLANS_CONFIGS: entries "SUMS/MAP", each "ctas_per_sm,min_vecs_per_thread" or empty for the default
  # (sums 8,16; map 16,4); the first entry is the baseline of the comparison.
  local i=0 files=() cfg
  for cfg in ${PLANS_CONFIGS:-/ 8,8/ 4,8/ 8,32/ /8,8 /32,4}; do
    BNX_CUDA_SUMS_PLAN=${cfg%%/*} BNX_CUDA_MAP_PLAN=${cfg#*/} timeout -s INT -k 10 "$(cap ${PLANS_TIMEOUT:-60})" \
      "$PY" -m bnx bench --device cuda --shapes "${PLANS_SHAPES:-launch;rn50-56;rn50-7}" \
      --passes "${PLANS_PASSES:-train_fwd,train_bwd}" --peers native --json "$OUT/plans-$i.json" \
      > "$OUT/plans-$i-summary.txt" 2> "$OUT/plans-$i-progress.log"
    echo "plans $i ($cfg) rc=$?"
    [ -f "$OUT/plans-$i.json" ] && files+=("$OUT/plans-$i.json")
    i=$((i + 1))
  done
  [ ${#files[@]} -ge 2 ] && "$PY" benchmarks/compare_runs.py "${files[@]}" --md "$OUT/plans.md" | tail -n 70
}

run_ncu() {
  # NCU_CASES: entries "pass:dtype:layout:shape[:impl]" (impl bnx by default, or native); NCU_CONFIGS: bnx's walk
  # switches, as in the groups stage ("PL[B[D[O]]]"; default "10 110": the defaults, then the barrier-free
  # L2-grouped launch), each bnx case once per configuration. Application replay reruns the program once per
  # pass over the metrics, so each kernel finds the L2 that the kernels before it left, as in the benchmark.
  if ! command -v ncu > /dev/null; then echo "ncu: not on the PATH, stage skipped"; return 0; fi
  local metrics="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct"
  local files=() spec p d l s impl cfgs cfg c l2 f
  for spec in ${NCU_CASES:-train_fwd_bwd:bf16:nchw:256,256,56,56 train_fwd_bwd:fp32:nhwc:32,64,56,56 train_fwd_bwd:fp32:nhwc:32,64,56,56:native}; do
    IFS=: read -r p d l s impl <<< "$spec"
    impl=${impl:-bnx}
    cfgs=${NCU_CONFIGS:-10 110}
    [ "$impl" = bnx ] || cfgs=native
    for cfg in $cfgs; do
      f="$OUT/ncu-$p-$d-$l-$s-$cfg.txt"
      c=$cfg
      [ "$cfg" = native ] && c=10  # bnx's defaults; it is not called
      l2=${c:1:1}
      [ "$l2" = a ] && l2=auto
      BNX_CUDA_PLANE_GROUPS=${c:0:1} BNX_CUDA_L2_GROUPS=$l2 BNX_CUDA_L2_GROUPS_BARRIERS=${c:2:1} BNX_CUDA_PDL=${c:3:1} \
        BNX_CUDA_ON_CHIP=${c:4:1} \
        timeout -s INT -k 10 "$(cap ${NCU_TIMEOUT:-120})" ncu --profile-from-start off --replay-mode application \
        --cache-control none --clock-control none --metrics "$metrics" --csv --print-units base \
        "$PY" benchmarks/ncu_case.py --pass "$p" --dtype "$d" --layout "$l" --shape "$s" --impl "$impl" > "$f" 2>&1
      echo "ncu $spec $cfg rc=$?"
      files+=("$f")
    done
  done
  "$PY" benchmarks/ncu_summary.py "${files[@]}" --md "$OUT/ncu.md" > /dev/null 2> "$OUT/ncu-summary.err"
  [ -s "$OUT/ncu.md" ] && grep -A 20 "^## Side by side" "$OUT/ncu.md"
  [ -s "$OUT/ncu-summary.err" ] && cat "$OUT/ncu-summary.err"
  return 0
}

run_sanitize() {
  # memcheck: any access outside an allocation (the caching allocator off, so that each tensor is its own
  # allocation); racecheck: shared-memory races, which the CPU emulation cannot see. Both slow kernels down
  # by orders of magnitude, hence small shapes (ids shape0-4: up to (5,16,14,14)) and four of the six walk
  # configurations, plus one case of the barrier-free grouped launch on narrowed channels-last columns (fp32,
  # (16,64,32,32)) and one of the programmatic dependent launches (fp32 channels-last (32,64,28,28), many
  # splits per channel), plus the on-chip launch on (6,5,7,9) (shared-memory cache, cp.async, both layouts and
  # dtypes), whole and with 2 cache slots a thread (the rest read from global memory); SANITIZE_TESTS overrides
  # the -k expression.
  local k="${SANITIZE_TESTS:-(test_fused_passes_match_reference and (default or l2_groups_plane_groups_off or two_barriers or no_barrier) and not shape5 and not shape6) or (narrowed_channels_last and no_barrier and row16 and dtype0) or (programmatic_dependent_launch and shape1 and dtype0 and nhwc) or (on_chip_launch_matches_reference and shape0) or (on_chip_partial_cache and shape0)}"
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 10 "$(cap ${SANITIZE_TIMEOUT:-150})" \
      compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k "$k" > "$OUT/sanitize-$tool.log" 2>&1
    echo "sanitize $tool rc=$? (99: the sanitizer found errors)" | tee -a "$OUT/sanitize-$tool.log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^========= [A-Z]|passed|failed" "$OUT/sanitize-$tool.log" | head -n 12
  done
}

for s in "${stages[@]}"; do
  if [ $(( DEADLINE - $(date +%s) )) -lt 20 ]; then echo "== $s skipped: BUDGET_S spent"; continue; fi
  echo "== $s ($(( DEADLINE - $(date +%s) )) s left)"
  case "$s" in
    build) run_build ;;
    tests) run_tests ;;
    cli) run_cli ;;
    bench) run_bench "$@" ;;
    groups) run_groups ;;
    plans) run_plans ;;
    ncu) run_ncu ;;
    sanitize) run_sanitize ;;
    *) echo "gpu_check: unknown stage $s"; exit 2 ;;
  esac
  [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$OUT" .
done
