#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over the GPU test cases (issue 6), on the GPU machine.
# Usage (repo root, after a build): scripts/sanitize.sh [BUILD_DIR]   (default build-gpu)
# Env: SANITIZE_TOOLS (default "memcheck racecheck synccheck"), SANITIZE_CASES (default: the list below),
#      SANITIZE_CASE_TIMEOUT (seconds per case and tool, default 1500),
#      OUT or LOG_DIR (logs go to $LOG_DIR/sanitize/<tool>.<case>.log).
# Every rank is a forked process: --target-processes all. NCCL makes calls that fail on purpose (probing),
# hence --report-api-errors no. The cases are the correctness ones with small shapes (the timing, 1000-round
# and dead-peer cases are left out: 10-100x slower under the tools, and the dead-peer ones time out on
# purpose); the stress case runs a few rounds. Device waits get a long timeout: instrumented peers are slow.
# The last lines are one count of findings per tool ("SANITIZE <tool>: N findings ...").
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-${BUILD_DIR:-build-gpu}}
LOG_DIR=${LOG_DIR:-${OUT:-$BUILD_DIR}}/sanitize
mkdir -p "$LOG_DIR"
BIN="$BUILD_DIR/tests/gpu/el_gpu_tests"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ ! -x "$BIN" ] || [ ! -x "$SAN" ]; then
  echo "SANITIZE: not run (missing $BIN or compute-sanitizer)"
  exit 1
fi
export NCCL_NVLS_ENABLE=0 EXPERTLINK_TIMEOUT_S=${EXPERTLINK_TIMEOUT_S:-120} EXPERTLINK_STRESS_ROUNDS=${EXPERTLINK_STRESS_ROUNDS:-6}
tools=(${SANITIZE_TOOLS:-memcheck racecheck synccheck})
cases=(${SANITIZE_CASES:-
  transport_pattern_every_peer_every_byte
  ht_edge_empty_rank_single_token_all_masked_alignment
  ht_fp8_scales_capacity_skewed
  ht_graph_capture_replays
  ll_tokens_0_to_n_masked_and_duplicates
  ll_hook_two_in_flight_third_rejected
  ll_zero_copy_combine_buffer
  ll_rejects_bad_arguments_naming_them
  reliability_bad_arguments_refused_buffer_still_correct
  reliability_stress_mixed_ht_ll_one_buffer
  stream_order_ht_comm_stream_async_event_matches_oracle
  stream_order_ll_comm_stream_fused_async_and_split_joined})

# The tools run side by side (each its own processes on the same GPUs), one case after another per tool.
run_tool() {
  local tool=$1 findings=0 failed=() c log rc n
  for c in "${cases[@]}"; do
    log="$LOG_DIR/$tool.$c.log"
    timeout "${SANITIZE_CASE_TIMEOUT:-1500}" "$SAN" --tool "$tool" --target-processes all --report-api-errors no \
      "$BIN" "$c" >"$log" 2>&1
    rc=$?
    # One "ERROR SUMMARY: N error(s)" per process the tool followed (launcher and ranks).
    n=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {print s + 0}')
    findings=$((findings + n))
    grep -qE '^PASS ' "$log" || failed+=("$c(rc=$rc)")
    echo "$tool $c: $n findings, $(grep -oE '^(PASS|FAIL|SKIP) .*' "$log" | tail -1)"
  done
  echo "SANITIZE $tool: $findings findings over ${#cases[@]} cases${failed:+; not passing under the tool: ${failed[*]}}" \
    >"$LOG_DIR/$tool.summary"
}
for tool in "${tools[@]}"; do run_tool "$tool" & done
wait
for tool in "${tools[@]}"; do cat "$LOG_DIR/$tool.summary" 2>/dev/null || echo "SANITIZE $tool: no summary"; done
