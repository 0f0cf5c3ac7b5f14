expertlink_cpu_test(test_workload ${CMAKE_CURRENT_LIST_DIR}/workload_test.cpp)
