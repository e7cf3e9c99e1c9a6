# Stand-in for the template's config.cmake: the cache variables it reads.
foreach(var ASCEND_COMPUTE_UNIT ASCEND_CANN_PACKAGE_PATH vendor_name ASCEND_PYTHON_EXECUTABLE
            ENABLE_BINARY_PACKAGE ENABLE_SOURCE_PACKAGE ASCEND_PACK_SHARED_LIBRARY)
    if(NOT DEFINED ${var})
        message(FATAL_ERROR "fake CANN: cache variable ${var} is not set by CMakePresets.json")
    endif()
endforeach()
set(FAKE_CANN_LOG ${ASCEND_CANN_PACKAGE_PATH}/calls.log)
if(NOT EXISTS ${FAKE_CANN_LOG})
    message(FATAL_ERROR "fake CANN: ASCEND_CANN_PACKAGE_PATH=${ASCEND_CANN_PACKAGE_PATH} is not the CANN installation")
endif()
set(ASCEND_AUTOGEN_PATH ${CMAKE_BINARY_DIR}/autogen)
file(MAKE_DIRECTORY ${ASCEND_AUTOGEN_PATH})
file(APPEND ${FAKE_CANN_LOG} "configure compute_unit=${ASCEND_COMPUTE_UNIT} vendor=${vendor_name} shared=${ASCEND_PACK_SHARED_LIBRARY}\n")
