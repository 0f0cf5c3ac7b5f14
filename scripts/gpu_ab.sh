#!/usr/bin/env bash
# A/B timing in one device call: the bench on several builds or settings, side by side, same machine.
# Device time is scarce and cards differ between calls (H100 / H200), so a comparison is only worth
# making within one call, with the baseline rebuilt and rerun beside the change.
#
#   Local:  scripts/gpu_ab.sh prepare BASE_REV [DIR [NAME=REV ...]]   DIR (default .snap) = this checkout's
#           HEAD, with BASE_REV exported into DIR/base, each further REV into DIR/NAME (a TREE of that name,
#           for bisecting a branch in one call) and .deps copied in; send DIR with the device call (carry).
#   Device: cd DIR && scripts/gpu_ab.sh run [el_bench args]   (builds first; `build` alone only builds, so
#           other builds can share the CPUs before anything is timed)
#           AB_VARIANTS lists what runs, each NAME=TREE[,VAR=VALUE...] with TREE "base", "cur" or a NAME;
#           default "base=base cur=cur". Example: AB_VARIANTS="base=base cur=cur bulk=cur,EXPERTLINK_HT_COPY=bulk"
#           AB_CMAKE_ARGS go to both builds, AB_CMAKE_ARGS_CUR to the current tree's only (e.g.
#           -DEXPERTLINK_HT_MIN_CHUNK=64). AB_EXTRA adds builds of the current tree, each NAME:ARG[,ARG...],
#           space-separated, usable as a TREE: AB_EXTRA="s6:-DEXPERTLINK_HT_COMBINE_SENDERS=6"
#           AB_VARIANTS="base=base cur=cur s6=s6". AB_TESTS=1 also builds the current tree's GPU cases
#           beside them and runs them after the timings (their log goes to $OUT when set; AB_TESTS_REGEX
#           picks some by name, as ctest -R). Default el_bench
#           args: HT workloads, uniform routing, 24 and 8 SMs.
# Prints one row per (workload, SMs) and one column (us) per variant; NCCL's baseline runs with the first.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/cmake_args.sh

prepare() {
  local rev=$1 dir=${2:-.snap}
  shift $(($# < 2 ? $# : 2))
  rm -rf "$dir" && mkdir -p "$dir/base"
  git archive HEAD | tar -x -C "$dir"
  git archive "$rev" | tar -x -C "$dir/base"
  echo "$dir: HEAD $(git rev-parse --short HEAD), base $(git rev-parse --short "$rev")"
  local tree
  for tree in "$@"; do  # NAME=REV: more trees, built beside base and cur
    mkdir -p "$dir/${tree%%=*}" && git archive "${tree#*=}" | tar -x -C "$dir/${tree%%=*}" || return 1
    echo "${tree%%=*}" >>"$dir/.ab_trees"
    echo "$dir/${tree%%=*}: $(git rev-parse --short "${tree#*=}")"
  done
  [ -d .deps ] && cp -r .deps "$dir/"
}

extra_trees() { [ -f .ab_trees ] && cat .ab_trees; true; }

# The builds run side by side (base, cur, each extra tree and AB_EXTRA): each gets an equal part of the CPUs, and the
# tests tree, when asked for, one more such part.
jobs_per_build() {
  local n=$(($(nproc) / (2 + $(wc -w <<<"${AB_EXTRA:-} $(extra_trees)"))))
  echo $((n > 0 ? n : 1))  # at least one (fewer CPUs than builds)
}

build() {  # TREE_DIR BUILD_DIR EXTRA_CMAKE_ARGS
  cmake -S "$1" -B "$2" "${EL_CMAKE_ARGS[@]}" -DEXPERTLINK_BUILD_TESTS=OFF $3 \
    >"$2.configure.log" 2>&1 &&
    cmake --build "$2" -j "$(jobs_per_build)" --target el_bench >"$2.build.log" 2>&1 ||
    { echo "build of $1 FAILED:"; tail -20 "$2.build.log" "$2.configure.log"; return 1; }
}

build_all() {
  local pids=()
  [ -d base ] && { build base build-ab-base "${AB_CMAKE_ARGS:-}" & pids+=($!); }
  for tree in $(extra_trees); do
    build "$tree" "build-ab-$tree" "${AB_CMAKE_ARGS:-}" & pids+=($!)
  done
  build . build-ab-cur "${AB_CMAKE_ARGS:-} ${AB_CMAKE_ARGS_CUR:-}" & pids+=($!)
  for extra in ${AB_EXTRA:-}; do
    build . "build-ab-${extra%%:*}" "${AB_CMAKE_ARGS:-} ${AB_CMAKE_ARGS_CUR:-} $(tr , ' ' <<<"${extra#*:}")" & pids+=($!)
  done
  if [ "${AB_TESTS:-0}" = 1 ]; then  # the current tree's GPU cases, built beside the variants
    { cmake -S . -B build-ab-tests "${EL_CMAKE_ARGS[@]}" -DEXPERTLINK_BUILD_BENCH=OFF >build-ab-tests.configure.log 2>&1 &&
      cmake --build build-ab-tests -j "$(jobs_per_build)" >build-ab-tests.build.log 2>&1 ||
      { echo "build of the tests FAILED:"; tail -20 build-ab-tests.build.log; false; }; } & pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p" || return 1; done
}

run() {
  export NCCL_NVLS_ENABLE=0
  local args=("$@")
  [ ${#args[@]} -eq 0 ] && args=(--workloads ht_dispatch_fp8,ht_dispatch_bf16,ht_combine_bf16 --routing uniform --sms 24,8)
  local variants=(${AB_VARIANTS:-base=base cur=cur})
  build_all || exit 1
  nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | sed 's/^/card: /'
  local first=1 out=/tmp/gpu_ab
  rm -rf "$out" && mkdir -p "$out"
  for v in "${variants[@]}"; do
    local name=${v%%=*} spec=${v#*=}
    local tree=${spec%%,*} envs=()
    [ "$spec" != "$tree" ] && IFS=, read -r -a envs <<<"${spec#*,}"
    local libs=(--libraries expertlink)
    [ $first = 1 ] && libs=()  # the NCCL baseline once, with the first variant
    first=0
    env "${envs[@]}" timeout 300 "build-ab-$tree/bench/el_bench" "${args[@]}" "${libs[@]}" --no-plot \
      --out "$out/$name" --commit "ab-$name" >"$out/$name.log" 2>&1 || echo "$name: el_bench failed (see $out/$name.log)"
    grep -E '^(ht|ll)_' "$out/$name.log" | sort -u | awk -v n="$name" '{print n, $1, $2, $9, $5, $13, $NF}' >>"$out/rows.txt"
  done
  python3 - "$out/rows.txt" "${variants[@]%%=*}" <<'EOF'
import sys
rows, names = sys.argv[1], sys.argv[2:]
table = {}
for line in open(rows):
    name, workload, lib, sms, us, kernel_us, check = line.split()
    key = (workload, lib, sms)
    if kernel_us == check:  # a tree from before the kernel_us column
        kernel_us = "-"
    cell = us + ("" if kernel_us == "-" else "/" + kernel_us)  # event time / kernel time
    table.setdefault(key, {})[name] = cell + ("" if check == "ok" else " " + check)
print("us: event time / kernel time (bench/kernel_clock.hpp)")
print(f"{'workload':<26}{'lib':<11}{'SMs':>4}" + "".join(f"{n:>16}" for n in names))
for (workload, lib, sms), by in sorted(table.items()):
    print(f"{workload:<26}{lib:<11}{sms:>4}" + "".join(f"{by.get(n, '-'):>16}" for n in names))
EOF
  if [ "${AB_TESTS:-0}" = 1 ]; then
    (cd build-ab-tests && timeout 330 ctest -L gpu --timeout 120 ${AB_TESTS_REGEX:+-R "$AB_TESTS_REGEX"}) \
      >"$out/gpu_tests.log" 2>&1
    grep -E 'tests passed|tests failed' "$out/gpu_tests.log" | tail -1 | sed 's/^/gpu tests (cur): /'
    grep -E '^\s*[0-9]+ - .*\((Failed|Timeout|Not Run)\)' "$out/gpu_tests.log"
    [ -n "${OUT:-}" ] && cp "$out/gpu_tests.log" "$OUT"/
  fi
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  build) build_all ;;
  run) shift; run "$@" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
