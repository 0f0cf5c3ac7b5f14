# Tests of the CPU oracle (src/reference) and the workload generators.
expertlink_cpu_test(test_reference_numerics ${CMAKE_CURRENT_LIST_DIR}/numerics_test.cpp)
expertlink_cpu_test(test_reference_layout ${CMAKE_CURRENT_LIST_DIR}/layout_test.cpp)
expertlink_cpu_test(test_reference_ht ${CMAKE_CURRENT_LIST_DIR}/ht_test.cpp)
expertlink_cpu_test(test_reference_ll ${CMAKE_CURRENT_LIST_DIR}/ll_test.cpp)
expertlink_cpu_test(test_workload ${CMAKE_CURRENT_LIST_DIR}/workload_test.cpp)
