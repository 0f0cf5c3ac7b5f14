# The CPU oracle (include/expertlink/reference.hpp) and the workload generators (include/expertlink/workload.hpp).
set(EXPERTLINK_REFERENCE_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/numerics.cpp
  ${CMAKE_CURRENT_LIST_DIR}/layout.cpp
  ${CMAKE_CURRENT_LIST_DIR}/ht.cpp
  ${CMAKE_CURRENT_LIST_DIR}/ll.cpp
  ${CMAKE_CURRENT_LIST_DIR}/workload.cpp)
