// SSE2 kernels: the x86_64 baseline (no extra compiler flags needed).
#include <emmintrin.h>

#include "quantize_impl.h"

namespace edgefed::quant {
namespace {

struct Sse2 {
  using F = __m128;
  using I = __m128i;
  static constexpr std::size_t W = 4;
  static F load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, F v) { _mm_storeu_ps(p, v); }
  static F set1(float v) { return _mm_set1_ps(v); }
  static F div(F a, F b) { return _mm_div_ps(a, b); }
  static F mul(F a, F b) { return _mm_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm_sub_ps(a, b); }
  static F orf(F a, F b) { return _mm_or_ps(a, b); }
  static F vmax(F a, F b) { return _mm_max_ps(a, b); }
  static F vmin(F a, F b) { return _mm_min_ps(a, b); }
  static I cvt(F v) { return _mm_cvtps_epi32(v); }
  static F i2f(I v) { return _mm_cvtepi32_ps(v); }
  static I iadd(I a, I b) { return _mm_add_epi32(a, b); }
  static I set1i(int v) { return _mm_set1_epi32(v); }
  static void store_bytes4(std::uint8_t* p, I a, I b, I c, I d) {
    const I m = _mm_set1_epi32(0xff);
    const I ab = _mm_packs_epi32(_mm_and_si128(a, m), _mm_and_si128(b, m));
    const I cd = _mm_packs_epi32(_mm_and_si128(c, m), _mm_and_si128(d, m));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(ab, cd));
  }
  static void load_bytes4(const std::uint8_t* p, bool s, I& a, I& b, I& c, I& d) {
    const I v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (s) {
      const I lo = _mm_srai_epi16(_mm_unpacklo_epi8(v, v), 8);
      const I hi = _mm_srai_epi16(_mm_unpackhi_epi8(v, v), 8);
      a = _mm_srai_epi32(_mm_unpacklo_epi16(lo, lo), 16);
      b = _mm_srai_epi32(_mm_unpackhi_epi16(lo, lo), 16);
      c = _mm_srai_epi32(_mm_unpacklo_epi16(hi, hi), 16);
      d = _mm_srai_epi32(_mm_unpackhi_epi16(hi, hi), 16);
    } else {
      const I z = _mm_setzero_si128();
      const I lo = _mm_unpacklo_epi8(v, z), hi = _mm_unpackhi_epi8(v, z);
      a = _mm_unpacklo_epi16(lo, z), b = _mm_unpackhi_epi16(lo, z);
      c = _mm_unpacklo_epi16(hi, z), d = _mm_unpackhi_epi16(hi, z);
    }
  }
  static void store_nt(float* p, F v) { _mm_stream_ps(p, v); }
  static void store_bytes4_nt(std::uint8_t* p, I a, I b, I c, I d) {
    const I m = _mm_set1_epi32(0xff);
    const I ab = _mm_packs_epi32(_mm_and_si128(a, m), _mm_and_si128(b, m));
    const I cd = _mm_packs_epi32(_mm_and_si128(c, m), _mm_and_si128(d, m));
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(ab, cd));
  }
  static void fence() { _mm_sfence(); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
  static F lt_one(F a, F b) { return _mm_and_ps(_mm_cmplt_ps(a, b), _mm_set1_ps(1.f)); }
  static I cvtt(F v) { return _mm_cvttps_epi32(v); }
  static I iota() { return _mm_setr_epi32(0, 1, 2, 3); }
  static I ixor(I a, I b) { return _mm_xor_si128(a, b); }
  static I imul(I a, I b) {  // SSE2 has no pmulld: two 32x32->64 multiplies, keep low halves
    const I even = _mm_mul_epu32(a, b);
    const I odd = _mm_mul_epu32(_mm_srli_si128(a, 4), _mm_srli_si128(b, 4));
    return _mm_unpacklo_epi32(_mm_shuffle_epi32(even, _MM_SHUFFLE(0, 0, 2, 0)),
                              _mm_shuffle_epi32(odd, _MM_SHUFFLE(0, 0, 2, 0)));
  }
  template <int k>
  static I srl(I a) { return _mm_srli_epi32(a, k); }
  static bool has_nan(F v) { return _mm_movemask_ps(_mm_cmpunord_ps(v, v)) != 0; }
};

}  // namespace

const Kernels& kernels_sse2() {
  static const Kernels k = impl::make_kernels<Sse2>("sse2");
  return k;
}

}  // namespace edgefed::quant
