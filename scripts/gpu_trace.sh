#!/usr/bin/env bash
# Where the time goes, on the GPU machine: a build with the HT and LL phase stamps compiled in
# (-DEXPERTLINK_HT_TRACE=ON -DEXPERTLINK_LL_TRACE=ON; docs/ht_performance.md and docs/ll_performance.md
# say what the stamps measure), then the bench's HT and LL workloads with the printouts switched on.
#   scripts/gpu_trace.sh build      configure + build (tests included) into TRACE_BUILD_DIR (build-trace)
#   scripts/gpu_trace.sh run        the traced runs; TRACE_EVERY (25) = print every N calls,
#                                   TRACE_SMS (24,8) = HT SM budgets, TRACE_ENV = extra VAR=VALUE settings
# Timings from this build are not records: the stamps cost a little. Compare phases, not totals.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/cmake_args.sh
export NCCL_NVLS_ENABLE=0
dir=${TRACE_BUILD_DIR:-build-trace}

build() {
  cmake -S . -B "$dir" "${EL_CMAKE_ARGS[@]}" \
    -DEXPERTLINK_HT_TRACE=ON -DEXPERTLINK_LL_TRACE=ON >"$dir.configure.log" 2>&1 &&
    cmake --build "$dir" -j "${TRACE_JOBS:-$(nproc)}" >"$dir.build.log" 2>&1 ||
    { echo "trace build FAILED:"; tail -20 "$dir.build.log" "$dir.configure.log"; return 1; }
}

run() {
  local every=${TRACE_EVERY:-25} bench=$dir/bench/el_bench extra=(${TRACE_ENV:-})
  echo "== HT trace (every $every calls) ${extra[*]}"
  env "${extra[@]}" EXPERTLINK_HT_TRACE="$every" timeout 300 "$bench" --libraries expertlink --no-plot \
    --workloads ht_dispatch_bf16,ht_combine_bf16 --routing uniform --sms "${TRACE_SMS:-24,8}" \
    --out /tmp/trace-ht --commit trace 2>&1
  echo "== LL trace (every $every calls) ${extra[*]}"
  env "${extra[@]}" EXPERTLINK_LL_TRACE="$every" timeout 300 "$bench" --libraries expertlink --no-plot \
    --workloads ll_dispatch_fp8,ll_combine_bf16 --out /tmp/trace-ll --commit trace 2>&1
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
