#!/usr/bin/env bash
# One round of work on the GPU machine: configure, build (all cores), run every GPU test, run the bench,
# print a short summary last. Usage (from the repo root): scripts/gpu_check.sh [extra el_bench args]
# Env: BUILD_DIR (default build-gpu), EL_COMMIT (recorded in the bench JSON), OUT (results are copied there),
#      EL_PYTHON=0 (skip the Python package's tests), EL_SANITIZE=1 (also scripts/sanitize.sh), EL_CTEST=0 and
#      EL_BENCH=0 (skip the GPU cases or the bench: e.g. after scripts/gpu_ab.sh ran them, BUILD_DIR=build-ab-tests).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
BUILD_DIR=${BUILD_DIR:-build-gpu}
LOG_DIR=$BUILD_DIR/logs
mkdir -p "$LOG_DIR"
summary=()
note() { summary+=("$*"); }

nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
nvidia-smi topo -m 2>/dev/null | head -5

source scripts/cmake_args.sh
# The Python binding is built in the same tree where torch, nanobind and pytest are importable (the GPU
# machine has them and no network, so no `pip install .`: the package is staged from the build instead).
py=()
[ "${EL_PYTHON:-1}" = 1 ] && python3 -c "import torch, nanobind, pytest" 2>/dev/null && py=(-DEXPERTLINK_BUILD_PYTHON=ON)
if cmake -S . -B "$BUILD_DIR" "${EL_CMAKE_ARGS[@]}" "${py[@]}" ${CMAKE_ARGS:-} >"$LOG_DIR/configure.log" 2>&1 &&
   cmake --build "$BUILD_DIR" -j "$(nproc)" >"$LOG_DIR/build.log" 2>&1; then
  note "build: ok ($(grep -m1 'ExpertLink: NCCL' "$LOG_DIR/configure.log" | sed 's/.*ExpertLink: //'))"
else
  tail -n 40 "$LOG_DIR/configure.log" "$LOG_DIR/build.log"
  echo "SUMMARY: build FAILED"
  exit 1
fi

if [ "${EL_CTEST:-1}" = 1 ]; then
  (cd "$BUILD_DIR" && ctest -L gpu -V --timeout 300 2>&1) >"$LOG_DIR/gpu_tests.log"
  grep -E '^ *[0-9]+/[0-9]+ Test|FAIL|expected|error' "$LOG_DIR/gpu_tests.log" | grep -v '^[0-9]*: RUN' | head -60
  note "gpu tests: $(grep -E 'tests passed|tests failed' "$LOG_DIR/gpu_tests.log" | tail -1)"
  # Figures the tests print (detection times, barrier cost, ...), lines tagged "FIGURE".
  while read -r line; do note "  $line"; done < <(grep -o 'FIGURE.*' "$LOG_DIR/gpu_tests.log")
  grep -E '^\s*[0-9]+ - .*\((Failed|Timeout|Skipped|Not Run)\)' "$LOG_DIR/gpu_tests.log" | sed 's/^/  /' >"$LOG_DIR/bad.txt"
  while read -r line; do note "$line"; done <"$LOG_DIR/bad.txt"
else
  note "gpu tests: not run (EL_CTEST=0)"
fi

if [ ${#py[@]} -gt 0 ]; then
  stage="$BUILD_DIR/pystage"
  # Installed as the wheel lays it out (_C and libexpertlink side by side, $ORIGIN rpath), then the sources.
  rm -rf "$stage" && cmake --install "$BUILD_DIR" --component python --prefix "$stage" >/dev/null &&
    cp python/expertlink/*.py "$stage"/expertlink/
  PYTHONPATH="$stage" timeout 600 python3 -m pytest -q -rs tests/python >"$LOG_DIR/pytest.log" 2>&1
  grep -E '^(E  |FAILED|ERROR|SKIPPED)' "$LOG_DIR/pytest.log" | head -40
  note "python tests: $(grep -E '(passed|failed|error|skipped)' "$LOG_DIR/pytest.log" | tail -1)"
else
  note "python tests: not run (EL_PYTHON=0, or torch, nanobind or pytest missing)"
fi

if [ "${EL_BENCH:-1}" != 1 ]; then
  note "bench: not run (EL_BENCH=0)"
elif [ -x "$BUILD_DIR/bench/el_bench" ]; then
  mkdir -p bench/results
  if "$BUILD_DIR/bench/el_bench" --out bench/results --commit "${EL_COMMIT:-unknown}" "$@" 2>&1 | tee "$LOG_DIR/bench.log"; then
    note "bench: ok"
  else
    note "bench: FAILED (see bench.log)"
  fi
  # Only this run's record comes back (the device returns at most 8 files).
  [ -n "${OUT:-}" ] && cp "$(ls -t bench/results/*.json | head -1)" "$(ls -t bench/results/*.png | head -1)" "$OUT"/ 2>/dev/null
else
  note "bench: not built"
fi

[ -n "${OUT:-}" ] && cp "$LOG_DIR"/{gpu_tests,pytest,bench}.log "$OUT"/ 2>/dev/null
# compute-sanitizer over the GPU cases (slow: minutes per tool), only when asked: EL_SANITIZE=1.
if [ "${EL_SANITIZE:-0}" = 1 ]; then
  LOG_DIR="$LOG_DIR" scripts/sanitize.sh "$BUILD_DIR" 2>&1 | tee "$LOG_DIR/sanitize.log" | tail -n 40
  while read -r line; do note "$line"; done < <(grep '^SANITIZE' "$LOG_DIR/sanitize.log")
fi

echo
echo "================ SUMMARY ================"
printf '%s\n' "${summary[@]}"
