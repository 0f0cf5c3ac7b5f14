# Finds NCCL (>= 2.28, with the device API headers) and defines the imported target NCCL::nccl.
# Search order: EXPERTLINK_NCCL_ROOT (or $NCCL_ROOT), the CUDA toolkit, then the nvidia-nccl Python wheel
# next to torch (lib/libnccl.so.2 only, no unversioned symlink: linked by full path, with an rpath), so
# that a Python process loading torch and ExpertLink holds one libnccl.
if(TARGET NCCL::nccl)
  return()
endif()

set(_el_nccl_hints "")
if(EXPERTLINK_NCCL_ROOT)
  list(APPEND _el_nccl_hints "${EXPERTLINK_NCCL_ROOT}")
elseif(DEFINED ENV{NCCL_ROOT})
  list(APPEND _el_nccl_hints "$ENV{NCCL_ROOT}")
endif()
if(NOT _el_nccl_hints)
  get_filename_component(_el_cuda_root "${CUDAToolkit_INCLUDE_DIRS}" DIRECTORY)
  if(EXISTS "${CUDAToolkit_INCLUDE_DIRS}/nccl.h" AND EXISTS "${CUDAToolkit_INCLUDE_DIRS}/nccl_device.h")
    list(APPEND _el_nccl_hints "${_el_cuda_root}")
    set(_el_nccl_libdir "${CUDAToolkit_LIBRARY_DIR}")
  else()
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(
        COMMAND "${Python3_EXECUTABLE}" -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
        OUTPUT_VARIABLE _el_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _el_rc)
      if(_el_rc EQUAL 0 AND EXISTS "${_el_wheel}/include/nccl.h")
        list(APPEND _el_nccl_hints "${_el_wheel}")
      endif()
    endif()
  endif()
endif()

find_path(NCCL_INCLUDE_DIR NAMES nccl.h nccl_device.h HINTS ${_el_nccl_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_el_nccl_hints} ${_el_nccl_libdir}
             PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY OR NOT EXISTS "${NCCL_INCLUDE_DIR}/nccl_device.h")
  message(FATAL_ERROR
    "ExpertLink needs NCCL >= 2.28 with its device API (nccl.h, nccl_device.h) and libnccl. Looked in: "
    "'${_el_nccl_hints}'. Set -DEXPERTLINK_NCCL_ROOT=<prefix> or install the nvidia-nccl wheel (torch ships it).")
endif()

file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _el_ver REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) ")
string(REGEX MATCH "NCCL_MAJOR ([0-9]+)" _m "${_el_ver}")
set(NCCL_VERSION_MAJOR ${CMAKE_MATCH_1})
string(REGEX MATCH "NCCL_MINOR ([0-9]+)" _m "${_el_ver}")
set(NCCL_VERSION_MINOR ${CMAKE_MATCH_1})
string(REGEX MATCH "NCCL_PATCH ([0-9]+)" _m "${_el_ver}")
set(NCCL_VERSION "${NCCL_VERSION_MAJOR}.${NCCL_VERSION_MINOR}.${CMAKE_MATCH_1}")
if(NCCL_VERSION VERSION_LESS 2.28)
  message(FATAL_ERROR "NCCL ${NCCL_VERSION} at ${NCCL_INCLUDE_DIR} is too old: the device API needs >= 2.28")
endif()
message(STATUS "ExpertLink: NCCL ${NCCL_VERSION}: ${NCCL_INCLUDE_DIR}, ${NCCL_LIBRARY}")

add_library(NCCL::nccl SHARED IMPORTED GLOBAL)
set_target_properties(NCCL::nccl PROPERTIES
  IMPORTED_LOCATION "${NCCL_LIBRARY}"
  IMPORTED_NO_SONAME FALSE
  INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
