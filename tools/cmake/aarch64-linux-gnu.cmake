# CMake toolchain for cross-compiling edgefed._core for 64-bit Arm Linux (Raspberry Pi OS
# bookworm / Debian 12 arm64) on an x86_64 Debian host with aarch64-linux-gnu-g++.
# tools/build-wheels.sh uses it through scikit-build-core (cmake.toolchain-file), so the
# aarch64 wheel comes from the same CMakeLists.txt as the native one.
#
# EDGEFED_AARCH64_PYINC (environment): a folder holding the target's Python headers, laid
# out like Debian's /usr/include (python3.X/ plus aarch64-linux-gnu/python3.X/pyconfig.h).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)

if(NOT DEFINED ENV{EDGEFED_AARCH64_PYINC})
  message(FATAL_ERROR "EDGEFED_AARCH64_PYINC is not set: point it at the aarch64 Python "
                      "headers (tools/build-wheels.sh fetches them)")
endif()
set(_pyver "$ENV{EDGEFED_AARCH64_PYVER}")
# FindPython cannot ask an x86 interpreter about an aarch64 Python: give it the answers.
set(Python_INCLUDE_DIR "$ENV{EDGEFED_AARCH64_PYINC}/python${_pyver}" CACHE PATH "" FORCE)
string(REPLACE "." "" _pyver_nodot "${_pyver}")
set(Python_SOABI "cpython-${_pyver_nodot}-aarch64-linux-gnu" CACHE STRING "")
include_directories(SYSTEM "$ENV{EDGEFED_AARCH64_PYINC}")
set(PYTHON_IS_DEBUG 0 CACHE INTERNAL "")
set(PYTHON_MODULE_DEBUG_POSTFIX "" CACHE INTERNAL "")
set(PYTHON_MODULE_EXTENSION ".cpython-${_pyver_nodot}-aarch64-linux-gnu.so" CACHE INTERNAL "")
