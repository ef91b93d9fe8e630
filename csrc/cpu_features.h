// Runtime CPU feature detection for the kernel dispatch (MLAS style): the baseline kernel
// is always available and is upgraded only when both the CPU (CPUID) and the operating
// system (XGETBV: the OS saves the ymm / zmm register state on context switches) allow it.
#pragma once

#include <cstdint>

#if defined(EDGEFED_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace edgefed {

struct CpuFeatures {
  bool sse2 = false;
  bool avx2 = false;    // AVX2 + FMA + OS ymm state
  bool avx512 = false;  // AVX-512 F/BW/VL/DQ + OS zmm/opmask state
  bool neon = false;
};

#if defined(EDGEFED_X86) && (defined(__GNUC__) || defined(__clang__))
inline std::uint64_t xgetbv0() {
  std::uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}
#endif

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(EDGEFED_X86) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  f.sse2 = true;  // part of x86_64
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
  if (!osxsave || !avx) return f;
  const std::uint64_t xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
  f.avx2 = avx2 && fma && ymm_state;
  f.avx512 = f.avx2 && avx512 && zmm_state;
#elif defined(EDGEFED_ARM64) || defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64
#endif
  return f;
}

}  // namespace edgefed
