# Builds and runs tests/package/consumer against advtrain, either installed
# into a temporary prefix (MODE=install, find_package) or added as a
# subdirectory (MODE=subdirectory).
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()

set(consumer_args -DADVTRAIN_MODE=${MODE})
if(MODE STREQUAL "install")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/advtrain -G ${GENERATOR}
      -DADVTRAIN_BUILD_TESTS=OFF -DADVTRAIN_BUILD_EXAMPLES=OFF
      -DADVTRAIN_INSTALL=ON -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/advtrain)
  if(NOT EXISTS ${WORK_DIR}/prefix/include/advtrain/advtrain.h)
    message(FATAL_ERROR "install did not copy the headers")
  endif()
  list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  list(APPEND consumer_args -DADVTRAIN_SOURCE_DIR=${SOURCE_DIR})
endif()

run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/consumer -B ${WORK_DIR}/consumer
    -G ${GENERATOR} ${consumer_args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/consumer)
