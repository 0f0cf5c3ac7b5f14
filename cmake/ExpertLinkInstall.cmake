include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS expertlink EXPORT ExpertLinkTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY include/expertlink DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT ExpertLinkTargets NAMESPACE ExpertLink:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ExpertLink)
configure_package_config_file(cmake/ExpertLinkConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/ExpertLinkConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ExpertLink)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/ExpertLinkConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/ExpertLinkConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/ExpertLinkConfigVersion.cmake
  cmake/ExpertLinkNccl.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ExpertLink)
