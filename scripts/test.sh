#!/usr/bin/env bash
# The test command (README quick start, .ci/run): installs build deps, builds everything, runs the CPU
# tests and the GPU tests (skipped, with the reason, where no GPU is visible), and checks that an outside
# CMake project can find_package(ExpertLink) from an install.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install_deps.sh
BUILD_DIR=${BUILD_DIR:-build}
export NCCL_NVLS_ENABLE=0
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)"

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -eq 0 ]; then
  echo "NOTE: no CUDA GPU visible: GPU tests will be reported as skipped (run scripts/gpu_check.sh on a GPU machine)"
fi
(cd "$BUILD_DIR" && ctest --output-on-failure --timeout 600)
(cd "$BUILD_DIR" && ctest -L gpu -N | grep -c 'Test *#' | xargs -I{} echo "GPU test cases registered: {}")

# Outside consumer: install into a scratch prefix and build tests/consumer against it.
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$BUILD_DIR" --prefix "$prefix" >/dev/null
cmake -S tests/consumer -B "$prefix/consumer-build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$prefix/consumer-build" >/dev/null
"$prefix/consumer-build/consumer"
echo "find_package(ExpertLink) consumer: built and ran"

# Python package: pip install . (library + expertlink._C, rebuilt without tests/bench) into the current
# Python, then pytest: CPU tests always run; GPU tests skip with the reason without torch or 2 GPUs.
python3 -m pip install -q --disable-pip-version-check nanobind scikit-build-core numpy pytest
python3 -m pip install -q --disable-pip-version-check --no-build-isolation .
python3 -m pytest tests/python -q -rs -p no:cacheprovider
