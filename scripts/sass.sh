#!/usr/bin/env bash
# What the compiler made of a kernel file, on a machine without a GPU: registers and spills per kernel, and
# the SASS with source lines, to check that loads meant to be in flight together are issued together
# (a store or a branch on a loaded value between two loads serializes them) and where spills sit.
# Usage (repo root, after a configured build): scripts/sass.sh BUILD_DIR SOURCE [KERNEL_SUBSTRING] [-DNAME=V...]
#   e.g. scripts/sass.sh build-rel6 src/kernels/ht_dispatch.cu ht_dispatch_kernelILb0E
# Writes BUILD_DIR/sass/<source>.sass (all kernels) and prints, for the chosen kernel (default: the first),
# the ptxas summary, the local-memory (spill) instructions per source line and the order of its global
# loads and stores. cuobjdump and nvdisasm come from NVIDIA's PyPI wheels (the CUDA toolkit here ships
# without them), unpacked once into build-tools/sass.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?build dir}
src=${2:?source file}
kernel=${3:-}
shift $(($# < 3 ? $# : 3))
tools="build-tools/sass"  # ignored by git, and not carried to the GPU machine as .deps is
if [ ! -x "$tools/nvdisasm" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
  mkdir -p "$tools"
  find "$tmp/x" -type f \( -name nvdisasm -o -name cuobjdump \) -exec cp {} "$tools/" \;
  chmod +x "$tools"/*
  rm -rf "$tmp"
fi
# The file's compile command from the build, turned into a cubin with line info.
cmd=$(python3 - "$build/compile_commands.json" "$(realpath "$src")" <<'EOF'
import json, sys
for e in json.load(open(sys.argv[1])):
    if e["file"] == sys.argv[2]:
        print(e["directory"]); print(e["command"]); break
else:
    sys.exit(f"{sys.argv[2]} is not in {sys.argv[1]}")
EOF
)
dir=$(head -1 <<<"$cmd")
compile=$(tail -1 <<<"$cmd" | sed -E 's/ -o [^ ]+//; s/ -c / /; s/--generate-code=[^ ]+//g; s/-Xcompiler=[^ ]+//g')
out=$(realpath "$build")/sass
mkdir -p "$out"
name=$(basename "$src")
if ! (cd "$dir" && eval "$compile -lineinfo -gencode arch=compute_90,code=sm_90 -cubin -o $out/$name.cubin -Xptxas=-v $*") \
  >"$out/$name.log" 2>&1; then
  cat "$out/$name.log"
  exit 1
fi
grep -E "Compiling entry|registers|spill" "$out/$name.log" | sed 's/ptxas info *: //'
"$tools/nvdisasm" -g -c "$out/$name.cubin" >"$out/$name.sass"
python3 - "$out/$name.sass" "$kernel" <<'EOF'
import collections, re, sys
text, want = open(sys.argv[1]).read().split("\n"), sys.argv[2]
kernels, cur = collections.OrderedDict(), None
for line in text:
    if line.startswith(".text."):
        cur = line[6:].rstrip(":")
        kernels[cur] = []
    elif cur:
        kernels[cur].append(line)
name = next((k for k in kernels if want in k), None)
if name is None:
    sys.exit(f"no kernel matching '{want}' in {list(kernels)}")
where, spills, order = None, collections.Counter(), []
for line in kernels[name]:
    m = re.search(r'//## File "(.*?)", line (\d+)', line)
    if m:
        where = f"{m.group(1).split('/')[-1]}:{m.group(2)}"
        continue
    m = re.search(r"/\*([0-9a-f]{4,5})\*/\s+(.*?)\s*;", line)
    if not m:
        continue
    insn = m.group(2)
    if re.search(r"\b(LDL|STL)\b", insn):
        spills[where] += 1
    if re.search(r"\b(LDG|STG|ST\.E|LD\.E|BAR\.SYNC|MEMBAR)\b", insn):
        order.append(f"  {m.group(1)}  {where:<28} {insn}")
print(f"\n{name}\nspill instructions by source line: " +
      (", ".join(f"{k} x{v}" for k, v in sorted(spills.items(), key=str)) or "none"))
print("global loads and stores, barriers and fences in program order:")
print("\n".join(order))
EOF
