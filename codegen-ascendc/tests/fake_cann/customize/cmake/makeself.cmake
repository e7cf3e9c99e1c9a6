# Stand-in for the template's makeself.cmake (CPack External package script):
# records what was staged and writes the .run file.
file(GLOB_RECURSE staged RELATIVE ${CPACK_TEMPORARY_DIRECTORY} ${CPACK_TEMPORARY_DIRECTORY}/*)
list(SORT staged)
string(REPLACE ";" " " staged_text "${staged}")
file(APPEND ${CPACK_FAKE_CANN_LOG} "package ${CPACK_PACKAGE_FILE_NAME} staged=${staged_text}\n")
file(WRITE ${CPACK_PACKAGE_DIRECTORY}/${CPACK_PACKAGE_FILE_NAME} "#!/bin/sh\n# fake CANN operator package\n")
