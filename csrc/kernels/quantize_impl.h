// The quantization kernels written once over a small vector-traits type V (MLAS style:
// thin per-ISA wrappers over one template). Each ISA file defines V and instantiates
// make_kernels<V>(). V must provide, with W lanes:
//   F load(const float*), store(float*, F), set1(float), div, mul, sub, orf(F, F)
//   vmax(a, b) == (a > b ? a : b), vmin(a, b) == (a < b ? a : b)   (x86 maxps/minps rules:
//       a NaN in `a` yields b, which clamps NaN to the lower bound)
//   I cvt(F) (round half to even, default rounding mode), F i2f(I), I iadd(I, I), I set1i(int)
//   store_bytes4(uint8_t*, I, I, I, I): low byte of each lane, 4*W bytes
//   load_bytes4(const uint8_t*, bool is_signed, I&, I&, I&, I&): 4*W bytes, sign/zero-extended
//   bool has_nan(F)
//   for stochastic rounding: F add, F lt_one(a, b) == (a < b ? 1.f : 0.f), I cvtt(F)
//   (truncate), I iota() (0, 1, ..., W-1), I ixor, I imul (low 32 bits), I srl<k> (logical)
//   streaming (non-temporal) stores for large outputs, falling back to plain stores where
//   the ISA has none: store_nt(float*, F) (W*4-byte aligned), store_bytes4_nt (4W-aligned),
//   fence() after a streaming loop.
// Outputs of at least kStreamBytes per call are written with streaming stores: they bypass
// the cache (no read-for-ownership of lines about to be overwritten), which saves a third
// of the memory traffic of dequantize; a short head loop first aligns the output pointer.
// Tails (n % 4W) go through the same vector body on a zero-padded stack buffer, so a tail
// element is rounded exactly like a body element.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quantize.h"

namespace edgefed::quant::impl {

constexpr std::size_t kStreamBytes = std::size_t{1} << 21;

inline std::size_t head_to_align(const void* p, std::size_t align) {
  const std::size_t mis = reinterpret_cast<std::uintptr_t>(p) % align;
  return mis ? (align - mis) : 0;
}

template <class V>
struct Impl {
  using F = typename V::F;
  using I = typename V::I;
  static constexpr std::size_t W = V::W, B = 4 * V::W;

  static bool minmax(const float* x, std::size_t n, float* mn_out, float* mx_out) {
    const F zero = V::set1(0.f);
    F mn0 = V::set1(x[0]), mn1 = mn0, mx0 = mn0, mx1 = mn0, bad = zero;
    std::size_t i = 0;
    for (; i + B <= n; i += B) {
      F a = V::load(x + i), b = V::load(x + i + W), c = V::load(x + i + 2 * W),
        d = V::load(x + i + 3 * W);
      bad = V::orf(bad, V::orf(V::orf(V::mul(a, zero), V::mul(b, zero)),
                               V::orf(V::mul(c, zero), V::mul(d, zero))));
      mn0 = V::vmin(a, mn0), mn1 = V::vmin(b, mn1), mx0 = V::vmax(a, mx0), mx1 = V::vmax(b, mx1);
      mn0 = V::vmin(c, mn0), mn1 = V::vmin(d, mn1), mx0 = V::vmax(c, mx0), mx1 = V::vmax(d, mx1);
    }
    alignas(64) float lo[2 * W], hi[2 * W];
    V::store(lo, mn0), V::store(lo + W, mn1), V::store(hi, mx0), V::store(hi + W, mx1);
    float mn = lo[0], mx = hi[0];
    bool nonfinite = V::has_nan(bad);
    for (std::size_t k = 0; k < 2 * W; ++k) {
      mn = lo[k] < mn ? lo[k] : mn;
      mx = hi[k] > mx ? hi[k] : mx;
    }
    for (; i < n; ++i) {
      const float v = x[i];
      nonfinite |= (v * 0.f) != 0.f;
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
    *mn_out = mn, *mx_out = mx;
    return nonfinite;
  }

  static bool minmax_cols(const float* x, std::size_t n, float* mn, float* mx) {
    const F zero = V::set1(0.f);
    F bad = zero;
    std::size_t i = 0;
    for (; i + W <= n; i += W) {
      F a = V::load(x + i);
      bad = V::orf(bad, V::mul(a, zero));
      V::store(mn + i, V::vmin(a, V::load(mn + i)));
      V::store(mx + i, V::vmax(a, V::load(mx + i)));
    }
    bool nonfinite = V::has_nan(bad);
    for (; i < n; ++i) {
      const float v = x[i];
      nonfinite |= (v * 0.f) != 0.f;
      mn[i] = v < mn[i] ? v : mn[i];
      mx[i] = v > mx[i] ? v : mx[i];
    }
    return nonfinite;
  }

  static inline I q1(F x, F s, F lo, F hi, I zi) {
    return V::iadd(V::cvt(V::vmin(V::vmax(V::div(x, s), lo), hi)), zi);
  }

  static bool quant(const float* x, std::size_t n, float scale, float zp, float qmin, float qmax,
                    std::uint8_t* out) {
    const F s = V::set1(scale), lo = V::set1(qmin - zp), hi = V::set1(qmax - zp),
            zero = V::set1(0.f);
    const I zi = V::set1i(static_cast<int>(zp));
    F bad = zero;
    auto body = [&](const float* xp, std::uint8_t* op, auto nt) {
      F a = V::load(xp), b = V::load(xp + W), c = V::load(xp + 2 * W), d = V::load(xp + 3 * W);
      bad = V::orf(bad, V::orf(V::orf(V::mul(a, zero), V::mul(b, zero)),
                               V::orf(V::mul(c, zero), V::mul(d, zero))));
      const I qa = q1(a, s, lo, hi, zi), qb = q1(b, s, lo, hi, zi), qc = q1(c, s, lo, hi, zi),
              qd = q1(d, s, lo, hi, zi);
      if constexpr (decltype(nt)::value) V::store_bytes4_nt(op, qa, qb, qc, qd);
      else V::store_bytes4(op, qa, qb, qc, qd);
    };
    auto partial = [&](std::size_t i, std::size_t m) {  // m < B elements via padded buffers
      alignas(64) float xb[B] = {};
      alignas(64) std::uint8_t ob[B];
      std::memcpy(xb, x + i, m * sizeof(float));
      body(xb, ob, std::false_type{});
      std::memcpy(out + i, ob, m);
    };
    std::size_t i = 0;
    if (n >= kStreamBytes) {
      i = std::min(n, head_to_align(out, B));
      if (i) partial(0, i);
      for (; i + B <= n; i += B) body(x + i, out + i, std::true_type{});
      V::fence();
    }
    for (; i + B <= n; i += B) body(x + i, out + i, std::false_type{});
    if (i < n) partial(i, n - i);
    return V::has_nan(bad);
  }

  static bool quant_vec(const float* x, std::size_t n, const float* scale, const float* zp,
                        float qmin, float qmax, std::uint8_t* out) {
    const F zero = V::set1(0.f), vqmin = V::set1(qmin), vqmax = V::set1(qmax);
    F bad = zero;
    auto one = [&](const float* xp, const float* sp, const float* zpp) {
      F a = V::load(xp), z = V::load(zpp);
      bad = V::orf(bad, V::mul(a, zero));
      return q1(a, V::load(sp), V::sub(vqmin, z), V::sub(vqmax, z), V::cvt(z));
    };
    auto body = [&](const float* xp, const float* sp, const float* zpp, std::uint8_t* op) {
      I a = one(xp, sp, zpp), b = one(xp + W, sp + W, zpp + W),
        c = one(xp + 2 * W, sp + 2 * W, zpp + 2 * W), d = one(xp + 3 * W, sp + 3 * W, zpp + 3 * W);
      V::store_bytes4(op, a, b, c, d);
    };
    std::size_t i = 0;
    for (; i + B <= n; i += B) body(x + i, scale + i, zp + i, out + i);
    if (i < n) {
      alignas(64) float xb[B] = {}, sb[B], zb[B] = {};
      alignas(64) std::uint8_t ob[B];
      std::fill(sb, sb + B, 1.f);
      std::memcpy(xb, x + i, (n - i) * sizeof(float));
      std::memcpy(sb, scale + i, (n - i) * sizeof(float));
      std::memcpy(zb, zp + i, (n - i) * sizeof(float));
      body(xb, sb, zb, ob);
      std::memcpy(out + i, ob, n - i);
    }
    return V::has_nan(bad);
  }

  // Counter-based hash of a 32-bit index (Wellons' lowbias32, twice, keyed): must match
  // Rng::uniform in quantize_common.cpp bit for bit.
  static inline I mix(I h) {
    h = V::ixor(h, V::template srl<16>(h));
    h = V::imul(h, V::set1i(0x7feb352d));
    h = V::ixor(h, V::template srl<15>(h));
    h = V::imul(h, V::set1i(static_cast<int>(0x846ca68bU)));
    return V::ixor(h, V::template srl<16>(h));
  }

  // Stochastic rounding: floor(v) + [u < v - floor(v)] with u from hash(seed, base + i).
  static bool stoch(const float* x, std::size_t n, std::uint32_t base, const float* scale,
                    const float* zp, bool vec, float qmin, float qmax, std::uint32_t k0,
                    std::uint32_t k1, std::uint8_t* out) {
    const F zero = V::set1(0.f), vqmin = V::set1(qmin), vqmax = V::set1(qmax),
            unit = V::set1(0x1p-24f);
    const I key0 = V::set1i(static_cast<int>(k0)), key1 = V::set1i(static_cast<int>(k1)),
            iota = V::iota();
    F bad = zero;
    auto one_vec = [&](const float* xp, const float* sp, const float* zpp, std::uint32_t idx) {
      const F a = V::load(xp), s = vec ? V::load(sp) : V::set1(*sp),
              z = vec ? V::load(zpp) : V::set1(*zpp);
      bad = V::orf(bad, V::mul(a, zero));
      F v = V::vmin(V::vmax(V::div(a, s), V::sub(vqmin, z)), V::sub(vqmax, z));
      const F t = V::i2f(V::cvtt(v));
      const F fl = V::sub(t, V::lt_one(v, t));  // floor (|v| <= 383, so t is exact)
      const I h = mix(V::iadd(mix(V::ixor(V::iadd(V::set1i(static_cast<int>(idx)), iota), key0)),
                             key1));
      const F u = V::mul(V::i2f(V::template srl<8>(h)), unit);
      const F r = V::add(fl, V::lt_one(u, V::sub(v, fl)));
      return V::iadd(V::cvt(r), V::cvt(z));
    };
    auto body = [&](const float* xp, const float* sp, const float* zpp, std::uint32_t idx,
                    std::uint8_t* op) {
      const std::size_t st = vec ? W : 0;
      const I a = one_vec(xp, sp, zpp, idx), b = one_vec(xp + W, sp + st, zpp + st, idx + W),
              c = one_vec(xp + 2 * W, sp + 2 * st, zpp + 2 * st, idx + 2 * W),
              d = one_vec(xp + 3 * W, sp + 3 * st, zpp + 3 * st, idx + 3 * W);
      V::store_bytes4(op, a, b, c, d);
    };
    std::size_t i = 0;
    for (; i + B <= n; i += B)
      body(x + i, scale + (vec ? i : 0), zp + (vec ? i : 0),
           base + static_cast<std::uint32_t>(i), out + i);
    if (i < n) {
      alignas(64) float xb[B] = {}, sb[B], zb[B] = {};
      alignas(64) std::uint8_t ob[B];
      std::fill(sb, sb + B, 1.f);
      const std::size_t m = n - i;
      std::memcpy(xb, x + i, m * sizeof(float));
      std::memcpy(sb, scale + (vec ? i : 0), (vec ? m : 1) * sizeof(float));
      std::memcpy(zb, zp + (vec ? i : 0), (vec ? m : 1) * sizeof(float));
      body(xb, sb, zb, base + static_cast<std::uint32_t>(i), ob);
      std::memcpy(out + i, ob, m);
    }
    return V::has_nan(bad);
  }

  static void dequant(const std::uint8_t* q, std::size_t n, bool is_signed, float scale,
                      float zp, float* out) {
    const F s = V::set1(scale), z = V::set1(zp);
    auto body = [&](const std::uint8_t* qp, float* op, auto nt) {
      I v[4];
      V::load_bytes4(qp, is_signed, v[0], v[1], v[2], v[3]);
      for (std::size_t k = 0; k < 4; ++k) {
        const F y = V::mul(V::sub(V::i2f(v[k]), z), s);
        if constexpr (decltype(nt)::value) V::store_nt(op + k * W, y);
        else V::store(op + k * W, y);
      }
    };
    auto partial = [&](std::size_t i, std::size_t m) {
      alignas(64) std::uint8_t qb[B] = {};
      alignas(64) float ob[B];
      std::memcpy(qb, q + i, m);
      body(qb, ob, std::false_type{});
      std::memcpy(out + i, ob, m * sizeof(float));
    };
    std::size_t i = 0;
    if (n * sizeof(float) >= kStreamBytes && reinterpret_cast<std::uintptr_t>(out) % 4 == 0) {
      i = std::min(n, head_to_align(out, W * sizeof(float)) / sizeof(float));
      if (i) partial(0, i);
      for (; i + B <= n; i += B) body(q + i, out + i, std::true_type{});
      V::fence();
    }
    for (; i + B <= n; i += B) body(q + i, out + i, std::false_type{});
    if (i < n) partial(i, n - i);
  }

  static void dequant_vec(const std::uint8_t* q, std::size_t n, bool is_signed,
                          const float* scale, const float* zp, float* out) {
    auto body = [&](const std::uint8_t* qp, const float* sp, const float* zpp, float* op) {
      I v[4];
      V::load_bytes4(qp, is_signed, v[0], v[1], v[2], v[3]);
      for (std::size_t k = 0; k < 4; ++k)
        V::store(op + k * W,
                 V::mul(V::sub(V::i2f(v[k]), V::load(zpp + k * W)), V::load(sp + k * W)));
    };
    std::size_t i = 0;
    for (; i + B <= n; i += B) body(q + i, scale + i, zp + i, out + i);
    if (i < n) {
      alignas(64) std::uint8_t qb[B] = {};
      alignas(64) float sb[B] = {}, zb[B] = {}, ob[B];
      std::memcpy(qb, q + i, n - i);
      std::memcpy(sb, scale + i, (n - i) * sizeof(float));
      std::memcpy(zb, zp + i, (n - i) * sizeof(float));
      body(qb, sb, zb, ob);
      std::memcpy(out + i, ob, (n - i) * sizeof(float));
    }
  }
};

template <class V>
Kernels make_kernels(const char* name) {
  using K = Impl<V>;
  return Kernels{name,        &K::minmax,  &K::minmax_cols, &K::quant,
                 &K::quant_vec, &K::dequant, &K::dequant_vec, &K::stoch};
}

}  // namespace edgefed::quant::impl
