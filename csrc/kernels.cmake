# Kernel sources, shared by the Python module and the standalone C++ test program.
# Per-ISA files get their own flags; the choice between them is made at run time
# (csrc/cpu_features.h), so the shipped binary runs on any CPU of its architecture.
# No -ffast-math and no -march=native anywhere: they break NaN/rounding semantics
# and portability.
set(EDGEFED_KERNEL_DIR ${CMAKE_CURRENT_LIST_DIR})
file(GLOB EDGEFED_GENERIC_SRC CONFIGURE_DEPENDS ${EDGEFED_KERNEL_DIR}/kernels/*_generic.cpp ${EDGEFED_KERNEL_DIR}/kernels/*_common.cpp)
add_library(edgefed_kernels STATIC ${EDGEFED_GENERIC_SRC})
target_include_directories(edgefed_kernels PUBLIC ${EDGEFED_KERNEL_DIR})
target_compile_features(edgefed_kernels PUBLIC cxx_std_17)
set_target_properties(edgefed_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
if(NOT MSVC)
  # -ffp-contract=off: no fused multiply-add contraction, so every ISA and architecture
  # rounds the same way (the results are compared bit for bit across x86_64 and aarch64).
  target_compile_options(edgefed_kernels PRIVATE -O3 -fno-math-errno -ffp-contract=off -Wall -Wextra)
endif()
find_package(Threads REQUIRED)
target_link_libraries(edgefed_kernels PUBLIC Threads::Threads)

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  file(GLOB EDGEFED_AVX2_SRC CONFIGURE_DEPENDS ${EDGEFED_KERNEL_DIR}/kernels/*_avx2.cpp)
  file(GLOB EDGEFED_AVX512_SRC CONFIGURE_DEPENDS ${EDGEFED_KERNEL_DIR}/kernels/*_avx512.cpp)
  # SSE2 is part of x86_64: these files need no extra flags.
  file(GLOB EDGEFED_SSE2_SRC CONFIGURE_DEPENDS ${EDGEFED_KERNEL_DIR}/kernels/*_sse2.cpp)
  target_sources(edgefed_kernels PRIVATE ${EDGEFED_AVX2_SRC} ${EDGEFED_AVX512_SRC} ${EDGEFED_SSE2_SRC})
  set_source_files_properties(${EDGEFED_AVX2_SRC} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  set_source_files_properties(${EDGEFED_AVX512_SRC} PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c")
  target_compile_definitions(edgefed_kernels PUBLIC EDGEFED_X86=1)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "aarch64|arm64")
  file(GLOB EDGEFED_NEON_SRC CONFIGURE_DEPENDS ${EDGEFED_KERNEL_DIR}/kernels/*_neon.cpp)
  target_sources(edgefed_kernels PRIVATE ${EDGEFED_NEON_SRC})
  target_compile_definitions(edgefed_kernels PUBLIC EDGEFED_ARM64=1)
endif()
