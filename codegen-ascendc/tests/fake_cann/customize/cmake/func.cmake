# Stand-in for the template's func.cmake: same function names and calling
# conventions; each checks its inputs and records its call.

function(opbuild)
    cmake_parse_arguments(OPBUILD "" "OUT_DIR" "OPS_SRC" ${ARGN})
    if(NOT OPBUILD_OPS_SRC)
        message(FATAL_ERROR "fake CANN: opbuild without op_host sources")
    endif()
    execute_process(COMMAND ${ASCEND_PYTHON_EXECUTABLE} ${ASCEND_CANN_PACKAGE_PATH}/toolkit/tools/opbuild/op_build
                            ${OPBUILD_OUT_DIR} ${OPBUILD_OPS_SRC}
                    RESULT_VARIABLE rc ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "opbuild run failed! ${err}")
    endif()
endfunction()

function(add_ops_compile_options OP_TYPE)
    cmake_parse_arguments(OP_COMPILE "" "OP_TYPE" "COMPUTE_UNIT;OPTIONS" ${ARGN})
    file(APPEND ${FAKE_CANN_LOG} "add_ops_compile_options ${OP_TYPE} options=${OP_COMPILE_OPTIONS}\n")
endfunction()

function(add_kernels_compile)
    if(ARGN)
        message(FATAL_ERROR "fake CANN: add_kernels_compile() takes no arguments, got: ${ARGN}")
    endif()
    if(NOT TARGET binary)
        add_custom_target(binary)
    endif()
    foreach(compute_unit ${ASCEND_COMPUTE_UNIT})
        execute_process(COMMAND ${ASCEND_PYTHON_EXECUTABLE} ${CMAKE_SOURCE_DIR}/cmake/util/ascendc_get_op_name.py
                                --ini-file=${ASCEND_AUTOGEN_PATH}/aic-${compute_unit}-ops-info.ini
                        OUTPUT_VARIABLE OP_TYPE_NAME RESULT_VARIABLE rc ERROR_VARIABLE err)
        if(NOT rc EQUAL 0)
            message(FATAL_ERROR "get op name failed: ${err}")
        endif()
        string(REPLACE "\n" ";" TYPE_NAME_LIST "${OP_TYPE_NAME}")
        foreach(TYPE_NAME IN LISTS TYPE_NAME_LIST)
            if(NOT "${TYPE_NAME}" STREQUAL "")
                string(REPLACE "-" ";" bin_sep ${TYPE_NAME})
                list(GET bin_sep 0 op_type)
                list(GET bin_sep 1 op_file)
                add_custom_target(compile_${compute_unit}_${op_file}
                    COMMAND ${ASCEND_PYTHON_EXECUTABLE} ${CMAKE_SOURCE_DIR}/cmake/util/ascendc_compile_kernel.py
                            --op-type=${op_type} --src=${CMAKE_SOURCE_DIR}/op_kernel/${op_file}.cpp
                            --compute-unit=${compute_unit} --log=${FAKE_CANN_LOG}
                            --out=${CMAKE_CURRENT_BINARY_DIR}/binary/${compute_unit}/${op_file}.o)
                add_dependencies(binary compile_${compute_unit}_${op_file})
                install(FILES ${CMAKE_CURRENT_BINARY_DIR}/binary/${compute_unit}/${op_file}.o
                        DESTINATION packages/vendors/${vendor_name}/op_impl/ai_core/tbe/kernel/${compute_unit} OPTIONAL)
            endif()
        endforeach()
    endforeach()
endfunction()
