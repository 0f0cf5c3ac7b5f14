#!/usr/bin/env bash
# Turns the crash stacks a rank prints (tools/multiproc: "binary(symbol+0xoff)[addr]" or "binary(+0xoff)")
# into function and source line, with addr2line. Usage: scripts/symbolize_stack.sh LOG [LOG...]
# Source lines need debug info (e.g. CMAKE_BUILD_TYPE=RelWithDebInfo); function names come from the symbols.
set -uo pipefail
grep -ohE '[^ :]+\((([A-Za-z0-9_]+)?\+0x[0-9a-f]+)\)' "$@" | sort -u | while read -r frame; do
  bin=${frame%%(*}
  inner=${frame#*(}
  inner=${inner%)}
  sym=${inner%+*}
  off=${inner##*+}
  [ -f "$bin" ] || continue
  if [ -n "$sym" ]; then
    base=$(nm "$bin" 2>/dev/null | awk -v s="$sym" '$3 == s {print $1; exit}')
    [ -n "$base" ] || continue
    addr=$(printf '0x%x' $((0x$base + off)))
  else
    addr=$off
  fi
  echo "$frame ->"
  addr2line -f -C -i -e "$bin" "$addr" | sed 's/^/    /'
done
