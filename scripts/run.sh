#!/usr/bin/env bash
# The main job (README quick start): builds the library and the bench, then runs the bench on all local
# GPUs (floor, NCCL baseline, ExpertLink), writing bench/results/<date>_<card>x<gpus>.json and a plot.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "run.sh: no NVIDIA GPU visible (nvidia-smi found none): the bench needs CUDA GPUs; nothing to run."
  echo "        The tests run without one: scripts/test.sh"
  exit 0
fi
deps=()
if [ -d .deps/include ]; then
  deps=(-DEXPERTLINK_DEPS_DIR="$PWD/.deps")
else
  source scripts/install_deps.sh
fi
BUILD_DIR=${BUILD_DIR:-build}
export NCCL_NVLS_ENABLE=0
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DEXPERTLINK_BUILD_TESTS=OFF "${deps[@]}"
cmake --build "$BUILD_DIR" -j "$(nproc)" --target el_bench
"$BUILD_DIR/bench/el_bench" --out bench/results --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$@"
