// AVX-512 (F/BW/VL/DQ) kernels; selected at run time only if CPUID reports them AND the OS
// saves the opmask / zmm state (XGETBV), see cpu_features.h.
#include <immintrin.h>

#include "quantize_impl.h"

namespace edgefed::quant {
namespace {

struct Avx512 {
  using F = __m512;
  using I = __m512i;
  static constexpr std::size_t W = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F orf(F a, F b) { return _mm512_or_ps(a, b); }
  static F vmax(F a, F b) { return _mm512_max_ps(a, b); }
  static F vmin(F a, F b) { return _mm512_min_ps(a, b); }
  static I cvt(F v) { return _mm512_cvtps_epi32(v); }
  static F i2f(I v) { return _mm512_cvtepi32_ps(v); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1i(int v) { return _mm512_set1_epi32(v); }
  static void st(std::uint8_t* p, I v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));  // truncating
  }
  static void store_bytes4(std::uint8_t* p, I a, I b, I c, I d) {
    st(p, a), st(p + 16, b), st(p + 32, c), st(p + 48, d);
  }
  static __m128i l16(const std::uint8_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  }
  static void load_bytes4(const std::uint8_t* p, bool s, I& a, I& b, I& c, I& d) {
    if (s) {
      a = _mm512_cvtepi8_epi32(l16(p)), b = _mm512_cvtepi8_epi32(l16(p + 16));
      c = _mm512_cvtepi8_epi32(l16(p + 32)), d = _mm512_cvtepi8_epi32(l16(p + 48));
    } else {
      a = _mm512_cvtepu8_epi32(l16(p)), b = _mm512_cvtepu8_epi32(l16(p + 16));
      c = _mm512_cvtepu8_epi32(l16(p + 32)), d = _mm512_cvtepu8_epi32(l16(p + 48));
    }
  }
  static void store_nt(float* p, F v) { _mm512_stream_ps(p, v); }
  static void stn(std::uint8_t* p, I v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
  }
  static void store_bytes4_nt(std::uint8_t* p, I a, I b, I c, I d) {
    stn(p, a), stn(p + 16, b), stn(p + 32, c), stn(p + 48, d);
  }
  static void fence() { _mm_sfence(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F lt_one(F a, F b) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), _mm512_set1_ps(1.f));
  }
  static I cvtt(F v) { return _mm512_cvttps_epi32(v); }
  static I iota() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I imul(I a, I b) { return _mm512_mullo_epi32(a, b); }
  template <int k>
  static I srl(I a) { return _mm512_srli_epi32(a, k); }
  static bool has_nan(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
};

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k = impl::make_kernels<Avx512>("avx512");
  return k;
}

}  // namespace edgefed::quant
