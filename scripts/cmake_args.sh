# Sourced (from the repo root) by the GPU-machine scripts: the cmake arguments they share. Sets
# EL_CMAKE_ARGS: a Release build, Ninja when present, and .deps (scripts/prepare_deps.sh) when this
# checkout carries it (the GPU machine cannot install anything).
EL_CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release)
command -v ninja >/dev/null && EL_CMAKE_ARGS+=(-G Ninja)
[ -d "$PWD/.deps/include" ] && EL_CMAKE_ARGS+=(-DEXPERTLINK_DEPS_DIR="$PWD/.deps")
