// NEON kernels for AArch64 (Advanced SIMD is mandatory there: no run-time check needed).
// vmax/vmin are built from a compare + select so NaN behaves exactly like x86 maxps/minps
// (NEON's own vmaxq propagates NaN, vmaxnmq drops it on either side).
#include <arm_neon.h>

#include "quantize_impl.h"

namespace edgefed::quant {
namespace {

struct Neon {
  using F = float32x4_t;
  using I = int32x4_t;
  static constexpr std::size_t W = 4;
  static F load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, F v) { vst1q_f32(p, v); }
  static F set1(float v) { return vdupq_n_f32(v); }
  static F div(F a, F b) { return vdivq_f32(a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F sub(F a, F b) { return vsubq_f32(a, b); }
  static F orf(F a, F b) {
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(a), vreinterpretq_u32_f32(b)));
  }
  static F vmax(F a, F b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
  static F vmin(F a, F b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
  static I cvt(F v) { return vcvtnq_s32_f32(v); }  // round to nearest, ties to even
  static F i2f(I v) { return vcvtq_f32_s32(v); }
  static I iadd(I a, I b) { return vaddq_s32(a, b); }
  static I set1i(int v) { return vdupq_n_s32(v); }
  static void store_bytes4(std::uint8_t* p, I a, I b, I c, I d) {
    const uint16x8_t ab = vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(a)),
                                       vmovn_u32(vreinterpretq_u32_s32(b)));
    const uint16x8_t cd = vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(c)),
                                       vmovn_u32(vreinterpretq_u32_s32(d)));
    vst1q_u8(p, vcombine_u8(vmovn_u16(ab), vmovn_u16(cd)));
  }
  static void load_bytes4(const std::uint8_t* p, bool s, I& a, I& b, I& c, I& d) {
    if (s) {
      const int8x16_t v = vld1q_s8(reinterpret_cast<const std::int8_t*>(p));
      const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
      a = vmovl_s16(vget_low_s16(lo)), b = vmovl_s16(vget_high_s16(lo));
      c = vmovl_s16(vget_low_s16(hi)), d = vmovl_s16(vget_high_s16(hi));
    } else {
      const uint8x16_t v = vld1q_u8(p);
      const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_u8(vget_high_u8(v));
      a = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo)));
      b = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(lo)));
      c = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi)));
      d = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(hi)));
    }
  }
  static void store_nt(float* p, F v) { store(p, v); }
  static void store_bytes4_nt(std::uint8_t* p, I a, I b, I c, I d) { store_bytes4(p, a, b, c, d); }
  static void fence() {}
  static F add(F a, F b) { return vaddq_f32(a, b); }
  static F lt_one(F a, F b) {
    return vbslq_f32(vcltq_f32(a, b), vdupq_n_f32(1.f), vdupq_n_f32(0.f));
  }
  static I cvtt(F v) { return vcvtq_s32_f32(v); }  // truncates toward zero
  static I iota() {
    static const std::int32_t k[4] = {0, 1, 2, 3};
    return vld1q_s32(k);
  }
  static I ixor(I a, I b) { return veorq_s32(a, b); }
  static I imul(I a, I b) { return vmulq_s32(a, b); }
  template <int k>
  static I srl(I a) { return vreinterpretq_s32_u32(vshrq_n_u32(vreinterpretq_u32_s32(a), k)); }
  static bool has_nan(F v) { return vmaxvq_u32(vmvnq_u32(vceqq_f32(v, v))) != 0; }
};

}  // namespace

const Kernels& kernels_neon() {
  static const Kernels k = impl::make_kernels<Neon>("neon");
  return k;
}

}  // namespace edgefed::quant
