#!/usr/bin/env bash
# Installs what building and testing need on a Debian machine with the CUDA toolkit (NCCL included) at
# /usr/local/cuda: CMake, Ninja, GoogleTest, nlohmann_json, CLI11. Skips what is already there.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
for pkg in libgtest-dev nlohmann-json3-dev libcli11-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit (13.0) at /usr/local/cuda" >&2; exit 1; }
