#!/usr/bin/env bash
# Applies .clang-format to every tracked C++/CUDA file (STYLE.md: "committed and applied"), or with --check
# lists the files it would change and exits 1 if there are any. Formatting depends on clang-format's
# version (the tree is formatted with Debian's 14.0.6), so CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.cpp' '*.hpp' '*.h' '*.cu' '*.cuh')
if [ "${1:-}" = --check ]; then
  bad=0
  for f in "${files[@]}"; do
    clang-format --style=file "$f" | cmp -s - "$f" || { echo "$f"; bad=1; }
  done
  exit $bad
fi
clang-format -i --style=file "${files[@]}"
