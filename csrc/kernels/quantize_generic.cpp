// Portable scalar kernels (W = 1): the reference every SIMD kernel must match bit for bit,
// and the only kernels on CPUs without a SIMD path. std::nearbyint honours the default
// round-to-nearest-even mode, like cvtps2dq / fcvtns.
#include <cmath>
#include <cstring>

#include "quantize_impl.h"

namespace edgefed::quant {
namespace {

struct Scalar {
  using F = float;
  using I = std::int32_t;
  static constexpr std::size_t W = 1;
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float v) { return v; }
  static F div(F a, F b) { return a / b; }
  static F mul(F a, F b) { return a * b; }
  static F sub(F a, F b) { return a - b; }
  static F orf(F a, F b) {
    std::uint32_t x, y;
    std::memcpy(&x, &a, 4), std::memcpy(&y, &b, 4);
    x |= y;
    std::memcpy(&a, &x, 4);
    return a;
  }
  static F vmax(F a, F b) { return a > b ? a : b; }
  static F vmin(F a, F b) { return a < b ? a : b; }
  static I cvt(F v) { return static_cast<I>(std::nearbyint(v)); }
  static F i2f(I v) { return static_cast<F>(v); }
  static I iadd(I a, I b) { return a + b; }
  static I set1i(int v) { return v; }
  static void store_bytes4(std::uint8_t* p, I a, I b, I c, I d) {
    p[0] = static_cast<std::uint8_t>(a), p[1] = static_cast<std::uint8_t>(b);
    p[2] = static_cast<std::uint8_t>(c), p[3] = static_cast<std::uint8_t>(d);
  }
  static I ext(std::uint8_t v, bool s) { return s ? I(static_cast<std::int8_t>(v)) : I(v); }
  static void load_bytes4(const std::uint8_t* p, bool s, I& a, I& b, I& c, I& d) {
    a = ext(p[0], s), b = ext(p[1], s), c = ext(p[2], s), d = ext(p[3], s);
  }
  static void store_nt(float* p, F v) { store(p, v); }
  static void store_bytes4_nt(std::uint8_t* p, I a, I b, I c, I d) { store_bytes4(p, a, b, c, d); }
  static void fence() {}
  static F add(F a, F b) { return a + b; }
  static F lt_one(F a, F b) { return a < b ? 1.f : 0.f; }
  static I cvtt(F v) { return static_cast<I>(v); }
  static I iota() { return 0; }
  static I ixor(I a, I b) { return a ^ b; }
  static I imul(I a, I b) {  // unsigned: wrap-around is defined
    return static_cast<I>(static_cast<std::uint32_t>(a) * static_cast<std::uint32_t>(b));
  }
  template <int k>
  static I srl(I a) { return static_cast<I>(static_cast<std::uint32_t>(a) >> k); }
  static bool has_nan(F v) { return v != v; }
};

}  // namespace

const Kernels& kernels_generic() {
  static const Kernels k = impl::make_kernels<Scalar>("generic");
  return k;
}

}  // namespace edgefed::quant
