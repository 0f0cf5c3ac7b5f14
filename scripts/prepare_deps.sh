#!/usr/bin/env bash
# Copies the header-only dependencies (nlohmann_json, CLI11; installed here from Debian) into .deps/include,
# which scripts/gpu_check.sh uses on the GPU machine (nothing can be installed there). Carry ".deps".
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in nlohmann-json3-dev libcli11-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$pkg" >/dev/null; }
done
rm -rf .deps && mkdir -p .deps/include
cp -r /usr/include/nlohmann /usr/include/CLI .deps/include/
echo "prepared .deps/include: $(ls .deps/include | tr '\n' ' ')"
