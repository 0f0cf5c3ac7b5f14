# Header-only tools of the bench and the tests: nlohmann_json (JSON) and CLI11 (argument parsing), from
# Debian (nlohmann-json3-dev, libcli11-dev). The GPU machine cannot install packages: there
# scripts/gpu_check.sh carries the same headers in .deps/include and passes EXPERTLINK_DEPS_DIR.
set(EXPERTLINK_DEPS_DIR "" CACHE PATH "Folder with include/nlohmann and include/CLI when they are not installed")

find_package(nlohmann_json 3 QUIET)
find_package(CLI11 QUIET)
foreach(_dep nlohmann_json CLI11)
  if(NOT ${_dep}_FOUND)
    if(_dep STREQUAL "nlohmann_json")
      set(_hdr nlohmann/json.hpp)
    else()
      set(_hdr CLI/CLI.hpp)
    endif()
    find_path(_el_${_dep}_inc NAMES ${_hdr} HINTS ${EXPERTLINK_DEPS_DIR}/include NO_DEFAULT_PATH)
    if(NOT _el_${_dep}_inc)
      message(FATAL_ERROR "${_dep} not found: apt-get install nlohmann-json3-dev libcli11-dev, "
                          "or pass -DEXPERTLINK_DEPS_DIR=<dir with include/${_hdr}>")
    endif()
    add_library(${_dep}::${_dep} INTERFACE IMPORTED GLOBAL)
    set_target_properties(${_dep}::${_dep} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_el_${_dep}_inc}")
  endif()
endforeach()
