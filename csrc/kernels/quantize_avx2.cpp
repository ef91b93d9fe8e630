// AVX2 kernels (compiled with -mavx2 -mfma; selected at run time only if the CPU and OS
// support AVX2).
#include <immintrin.h>

#include "quantize_impl.h"

namespace edgefed::quant {
namespace {

struct Avx2 {
  using F = __m256;
  using I = __m256i;
  static constexpr std::size_t W = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F orf(F a, F b) { return _mm256_or_ps(a, b); }
  static F vmax(F a, F b) { return _mm256_max_ps(a, b); }
  static F vmin(F a, F b) { return _mm256_min_ps(a, b); }
  static I cvt(F v) { return _mm256_cvtps_epi32(v); }
  static F i2f(I v) { return _mm256_cvtepi32_ps(v); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I set1i(int v) { return _mm256_set1_epi32(v); }
  static void store_bytes4(std::uint8_t* p, I a, I b, I c, I d) {
    const I m = _mm256_set1_epi32(0xff);
    const I ab = _mm256_packs_epi32(_mm256_and_si256(a, m), _mm256_and_si256(b, m));
    const I cd = _mm256_packs_epi32(_mm256_and_si256(c, m), _mm256_and_si256(d, m));
    const I r = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
  }
  static __m128i l8(const std::uint8_t* p) {
    return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  }
  static void load_bytes4(const std::uint8_t* p, bool s, I& a, I& b, I& c, I& d) {
    if (s) {
      a = _mm256_cvtepi8_epi32(l8(p)), b = _mm256_cvtepi8_epi32(l8(p + 8));
      c = _mm256_cvtepi8_epi32(l8(p + 16)), d = _mm256_cvtepi8_epi32(l8(p + 24));
    } else {
      a = _mm256_cvtepu8_epi32(l8(p)), b = _mm256_cvtepu8_epi32(l8(p + 8));
      c = _mm256_cvtepu8_epi32(l8(p + 16)), d = _mm256_cvtepu8_epi32(l8(p + 24));
    }
  }
  static void store_nt(float* p, F v) { _mm256_stream_ps(p, v); }
  static void store_bytes4_nt(std::uint8_t* p, I a, I b, I c, I d) {
    const I m = _mm256_set1_epi32(0xff);
    const I ab = _mm256_packs_epi32(_mm256_and_si256(a, m), _mm256_and_si256(b, m));
    const I cd = _mm256_packs_epi32(_mm256_and_si256(c, m), _mm256_and_si256(d, m));
    const I r = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd),
                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
  }
  static void fence() { _mm_sfence(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F lt_one(F a, F b) {
    return _mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ), _mm256_set1_ps(1.f));
  }
  static I cvtt(F v) { return _mm256_cvttps_epi32(v); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I imul(I a, I b) { return _mm256_mullo_epi32(a, b); }
  template <int k>
  static I srl(I a) { return _mm256_srli_epi32(a, k); }
  static bool has_nan(F v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
};

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k = impl::make_kernels<Avx2>("avx2");
  return k;
}

}  // namespace edgefed::quant
