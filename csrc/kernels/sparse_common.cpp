// Top-k, error feedback, index coding and int4 packing (portable C++; the hot loops are
// simple enough for the compiler to vectorise at the baseline ISA).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"
#include "sparse.h"

namespace edgefed {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;  // magnitudes >= this are Inf or NaN

inline uint32_t mag_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b & kAbsMask;
}

// Round half to even for |v| < 2^22 under the default rounding mode (no SSE4.1 needed,
// vectorises): adding and subtracting 1.5 * 2^23 leaves the nearest-even integer.
inline float round_even_small(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

inline float round_even(float v) {
  return round_even_small(v);
}

// splitmix64: tiny deterministic generator for sampling positions.
inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

[[noreturn]] void throw_nonfinite() {
  throw InvalidArgument("top-k input contains NaN or Inf");
}

// Strided random sample of magnitudes: one position drawn uniformly from each of s
// equal strides, so the sample covers the whole vector (robust to sorted data). The
// last n mod s elements are never sampled (fewer than s of them: negligible).
std::vector<uint32_t> sample_mags(const float* x, std::size_t n, std::size_t s, uint64_t seed) {
  std::vector<uint32_t> out(s);
  uint64_t st = seed ^ 0x5eed5eedull;
  const uint64_t stride = n / s;  // callers guarantee n >= s
  for (std::size_t i = 0; i < s; ++i) {
    uint64_t off = ((splitmix(st) & 0xffffffffull) * stride) >> 32;  // uniform in [0, stride)
    out[i] = mag_bits(x[i * stride + off]);
  }
  return out;
}

// r-th largest (1-based) of v (reorders v).
uint32_t kth_largest(std::vector<uint32_t>& v, std::size_t r) {
  std::nth_element(v.begin(), v.begin() + (r - 1), v.end(), std::greater<uint32_t>());
  return v[r - 1];
}

// Bit j set iff |x[j]| >= L (on magnitude bits), for 16 floats. SSE2 is part of the
// x86-64 baseline, so this needs no dispatch; other targets use the scalar loop.
inline uint32_t mask16_at_least(const float* x, uint32_t L) {
#if defined(__SSE2__)
  const __m128i absmask = _mm_set1_epi32(0x7fffffff);
  const __m128i lm1 = _mm_set1_epi32(static_cast<int32_t>(L) - 1);  // m >= L <=> m > L-1
  uint32_t mask = 0;
  for (int j = 0; j < 4; ++j) {
    __m128i v = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 4 * j)), absmask);
    mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, lm1))))
            << (4 * j);
  }
  return mask;
#else
  uint32_t mask = 0;
  for (int j = 0; j < 16; ++j) mask |= static_cast<uint32_t>(mag_bits(x[j]) >= L) << j;
  return mask;
#endif
}

// Collects indices with magnitude >= L, threaded, in index order. Returns false if the
// total exceeded `cap` (the partial result is then discarded by the caller).
// Hot loop: 16 compares -> a bit mask (vectorised), then one store per set bit into a
// buffer pre-sized to cap + 16, so there is no capacity check per element.
bool collect_at_least(const float* x, std::size_t n, uint32_t L, std::size_t cap, int threads,
                      std::vector<uint32_t>& out) {
  int t = effective_threads(n, threads);
  std::vector<std::unique_ptr<uint32_t[]>> parts(t);
  std::vector<std::size_t> counts(t, 0);
  std::atomic<bool> overflow{false};
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    parts[p].reset(new uint32_t[cap + 16]);
    uint32_t* buf = parts[p].get();
    std::size_t c = 0, i = b;
    for (; i + 16 <= e; i += 16) {
      uint32_t mask = mask16_at_least(x + i, L);
      while (mask) {
        buf[c++] = static_cast<uint32_t>(i + __builtin_ctz(mask));
        mask &= mask - 1;
      }
      if (c > cap) {
        overflow.store(true, std::memory_order_relaxed);
        return;
      }
    }
    for (; i < e; ++i)
      if (mag_bits(x[i]) >= L) buf[c++] = static_cast<uint32_t>(i);
    if (c > cap) overflow.store(true, std::memory_order_relaxed);
    counts[p] = c;
  });
  if (overflow.load()) return false;
  std::size_t total = 0;
  for (std::size_t c : counts) total += c;
  if (total > cap) return false;
  out.resize(total);
  std::size_t o = 0;
  for (int p = 0; p < t; ++p) {
    if (counts[p]) std::memcpy(out.data() + o, parts[p].get(), counts[p] * sizeof(uint32_t));
    o += counts[p];
  }
  return true;
}

// From candidate indices (index order, containing the top-k), keep exactly the top k.
TopK select_from_candidates(const float* x, const std::vector<uint32_t>& cand, std::size_t k) {
  std::vector<uint32_t> mags(cand.size());
  for (std::size_t i = 0; i < cand.size(); ++i) {
    mags[i] = mag_bits(x[cand[i]]);
    if (mags[i] >= kInfBits) throw_nonfinite();
  }
  TopK r;
  if (k == 0) return r;
  std::vector<uint32_t> tmp(mags);
  uint32_t T = kth_largest(tmp, k);
  std::size_t gt = 0;
  for (uint32_t m : mags) gt += m > T;
  std::size_t ties = k - gt;
  r.indices.reserve(k);
  r.values.reserve(k);
  for (std::size_t i = 0; i < cand.size(); ++i) {
    if (mags[i] > T || (mags[i] == T && ties > 0)) {
      if (mags[i] == T) --ties;
      r.indices.push_back(cand[i]);
      r.values.push_back(x[cand[i]]);
    }
  }
  return r;
}

TopK take_all(const float* x, std::size_t n) {
  TopK r;
  r.indices.resize(n);
  r.values.assign(x, x + n);
  for (std::size_t i = 0; i < n; ++i) {
    if (mag_bits(x[i]) >= kInfBits) throw_nonfinite();
    r.indices[i] = static_cast<uint32_t>(i);
  }
  return r;
}

TopK topk_small(const float* x, std::size_t n, std::size_t k) {
  std::vector<uint32_t> all(n);
  for (std::size_t i = 0; i < n; ++i) all[i] = static_cast<uint32_t>(i);
  return select_from_candidates(x, all, k);
}

}  // namespace

bool all_finite(const float* x, std::size_t n, int threads) {
  int t = effective_threads(n, threads);
  std::vector<char> ok(t, 1);
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    uint32_t worst = 0;
    for (std::size_t i = b; i < e; ++i) worst = std::max(worst, mag_bits(x[i]));
    ok[p] = worst < kInfBits;
  });
  for (char c : ok)
    if (!c) return false;
  return true;
}

TopK topk_radix(const float* x, std::size_t n, std::size_t k, int threads) {
  if (k == 0 || k >= n) {
    if (!all_finite(x, n, threads)) throw_nonfinite();
    if (k == 0) return {};
    return take_all(x, n);
  }
  constexpr std::size_t B1 = 1u << 16, B2 = 1u << 15;
  int t = effective_threads(n, threads);
  std::vector<std::vector<uint32_t>> h1(t, std::vector<uint32_t>(B1, 0));
  // Pass 1: histogram of the top 16 magnitude bits.
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    uint32_t* h = h1[p].data();
    for (std::size_t i = b; i < e; ++i) ++h[mag_bits(x[i]) >> 15];
  });
  std::vector<uint64_t> tot1(B1, 0);
  for (int p = 0; p < t; ++p)
    for (std::size_t j = 0; j < B1; ++j) tot1[j] += h1[p][j];
  for (std::size_t j = kInfBits >> 15; j < B1; ++j)
    if (tot1[j]) throw_nonfinite();
  std::size_t cum = 0, bin = B1;
  while (bin > 0) {
    --bin;
    if (cum + tot1[bin] >= k) break;
    cum += tot1[bin];
  }
  const uint32_t b1 = static_cast<uint32_t>(bin);
  const std::size_t need_in_b = k - cum;
  // Pass 2: histogram of the low 15 bits inside the threshold bin.
  std::vector<std::vector<uint32_t>> h2(t, std::vector<uint32_t>(B2, 0));
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    uint32_t* h = h2[p].data();
    for (std::size_t i = b; i < e; ++i) {
      uint32_t m = mag_bits(x[i]);
      if ((m >> 15) == b1) ++h[m & (B2 - 1)];
    }
  });
  std::vector<uint64_t> tot2(B2, 0);
  for (int p = 0; p < t; ++p)
    for (std::size_t j = 0; j < B2; ++j) tot2[j] += h2[p][j];
  std::size_t cum2 = 0, bin2 = B2;
  while (bin2 > 0) {
    --bin2;
    if (cum2 + tot2[bin2] >= need_in_b) break;
    cum2 += tot2[bin2];
  }
  const uint32_t T = (b1 << 15) | static_cast<uint32_t>(bin2);
  std::size_t ties_left = need_in_b - cum2;
  // Per-part output offsets: strictly-greater counts plus ties in index order.
  std::vector<std::size_t> off(t + 1, 0), take(t, 0);
  for (int p = 0; p < t; ++p) {
    std::size_t gt = 0;
    for (std::size_t j = b1 + 1; j < B1; ++j) gt += h1[p][j];
    for (std::size_t j = bin2 + 1; j < B2; ++j) gt += h2[p][j];
    take[p] = std::min<std::size_t>(h2[p][bin2], ties_left);
    ties_left -= take[p];
    off[p + 1] = off[p] + gt + take[p];
  }
  TopK r;
  r.indices.resize(k);
  r.values.resize(k);
  // Pass 3: write, each part into its own slice (index order preserved).
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    std::size_t o = off[p], tk = take[p];
    uint32_t* oi = r.indices.data();
    float* ov = r.values.data();
    for (std::size_t i = b; i < e; ++i) {
      uint32_t m = mag_bits(x[i]);
      if (m > T || (m == T && tk > 0)) {
        if (m == T) --tk;
        oi[o] = static_cast<uint32_t>(i);
        ov[o] = x[i];
        ++o;
      }
    }
  });
  return r;
}

TopK topk_exact(const float* x, std::size_t n, std::size_t k, int threads) {
  if (k == 0 || k >= n) return topk_radix(x, n, k, threads);
  if (n <= (1u << 16)) return topk_small(x, n, k);
  const std::size_t s = 1u << 16;
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double sp = s * p;
  // Conservative sample rank: 1.2x the expected hits plus 5 sigma; the k-th magnitude
  // lies above the resulting L unless the sample is off by > 5 standard deviations
  // (and then the radix path still gives the exact answer, only slower).
  const double r_lo = 1.2 * sp + 5.0 * std::sqrt(sp) + 8.0;
  if (r_lo >= 0.5 * s) return topk_radix(x, n, k, threads);
  std::vector<uint32_t> smp = sample_mags(x, n, s, 0x70b4c0ffeeull ^ n);
  const uint32_t L = kth_largest(smp, static_cast<std::size_t>(r_lo));
  // Expected candidates ~ n * r_lo / s; allow 3x before giving up on this path.
  const std::size_t cap = static_cast<std::size_t>(3.0 * r_lo / s * n) + 1024;
  std::vector<uint32_t> cand;
  if (L < kInfBits && collect_at_least(x, n, L, cap, threads, cand) && cand.size() >= k)
    return select_from_candidates(x, cand, k);
  return topk_radix(x, n, k, threads);
}

TopK topk_approx(const float* x, std::size_t n, std::size_t k, double tolerance, uint64_t seed,
                 int threads) {
  tolerance = std::max(0.0, tolerance);
  if (k == 0 || k >= n || n <= (1u << 16)) return topk_exact(x, n, k, threads);
  const double p = static_cast<double>(k) / static_cast<double>(n);
  std::size_t s = static_cast<std::size_t>(std::ceil(1000.0 / p));
  s = std::clamp<std::size_t>(s, 4096, std::max<std::size_t>(4096, n / 16));
  std::vector<uint32_t> smp = sample_mags(x, n, s, seed);
  std::size_t r = std::max<std::size_t>(1, static_cast<std::size_t>(std::llround(s * p)));
  r = std::min(r, s);
  const uint32_t T = kth_largest(smp, r);
  const std::size_t band = static_cast<std::size_t>(std::ceil(tolerance * k));
  const std::size_t hi = k + band, lo = k > band ? k - band : 0;
  std::vector<uint32_t> cand;
  if (T < kInfBits && collect_at_least(x, n, T, hi, threads, cand) && cand.size() >= lo &&
      cand.size() >= 1) {
    TopK out;
    out.indices = std::move(cand);
    out.values.resize(out.indices.size());
    for (std::size_t i = 0; i < out.indices.size(); ++i) out.values[i] = x[out.indices[i]];
    return out;
  }
  return topk_exact(x, n, k, threads);  // outside the band (or non-finite): exact path
}

void add_inplace_checked(float* residual, const float* update, std::size_t n, int threads) {
  int t = effective_threads(n, threads);
  std::vector<char> ok(t, 1);
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    uint32_t worst = 0;
    for (std::size_t i = b; i < e; ++i) {
      float v = residual[i] + update[i];
      residual[i] = v;
      worst = std::max(worst, mag_bits(v));
    }
    ok[p] = worst < kInfBits;
  });
  for (char c : ok)
    if (!c) throw InvalidArgument("update + residual contains NaN or Inf");
}

float quantize_int8_one_scale(const float* v, std::size_t n, int8_t* q) {
  float amax = 0.0f;
  for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  if (!(amax < std::numeric_limits<float>::infinity()))
    throw InvalidArgument("int8 input contains NaN or Inf");
  float scale = amax / 127.0f;
  if (scale == 0.0f) {
    std::fill(q, q + n, int8_t{0});
    return 0.0f;
  }
  for (std::size_t i = 0; i < n; ++i) {
    float c = std::clamp(v[i] / scale, -127.0f, 127.0f);
    q[i] = static_cast<int8_t>(round_even(c));
  }
  return scale;
}

EfTopK ef_topk(float* residual, const float* update, std::size_t n, std::size_t k, bool quantize,
               bool approximate, double tolerance, uint64_t seed, int threads) {
  add_inplace_checked(residual, update, n, threads);
  TopK tk = approximate ? topk_approx(residual, n, k, tolerance, seed, threads)
                        : topk_exact(residual, n, k, threads);
  EfTopK r;
  r.indices = std::move(tk.indices);
  const std::size_t m = r.indices.size();
  if (quantize) {
    r.q.resize(m);
    r.scale = quantize_int8_one_scale(tk.values.data(), m, r.q.data());
    for (std::size_t i = 0; i < m; ++i)
      residual[r.indices[i]] = tk.values[i] - static_cast<float>(r.q[i]) * r.scale;
  } else {
    for (std::size_t i = 0; i < m; ++i) residual[r.indices[i]] = 0.0f;
    r.values = std::move(tk.values);
  }
  return r;
}

// ---------------------------------------------------------------------------------
// Index coding.
// ---------------------------------------------------------------------------------
namespace {
inline std::size_t varint_len(uint32_t v) {
  std::size_t l = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++l;
  }
  return l;
}
}  // namespace

std::size_t varint_size(const uint32_t* idx, std::size_t count) {
  std::size_t s = 0;
  uint32_t prev = 0;
  for (std::size_t i = 0; i < count; ++i) {
    s += varint_len(i == 0 ? idx[0] : idx[i] - prev);
    prev = idx[i];
  }
  return s;
}

std::vector<uint8_t> encode_varint(const uint32_t* idx, std::size_t count) {
  std::vector<uint8_t> out(varint_size(idx, count));
  std::size_t o = 0;
  uint32_t prev = 0;
  for (std::size_t i = 0; i < count; ++i) {
    uint32_t v = i == 0 ? idx[0] : idx[i] - prev;
    prev = idx[i];
    while (v >= 0x80) {
      out[o++] = static_cast<uint8_t>(v | 0x80);
      v >>= 7;
    }
    out[o++] = static_cast<uint8_t>(v);
  }
  return out;
}

std::vector<uint8_t> encode_bitmap(const uint32_t* idx, std::size_t count, std::size_t n) {
  std::vector<uint8_t> out((n + 7) / 8, 0);
  for (std::size_t i = 0; i < count; ++i) out[idx[i] >> 3] |= uint8_t(1u << (idx[i] & 7));
  return out;
}

IndexCoding choose_index_coding(const uint32_t* idx, std::size_t count, std::size_t n) {
  return varint_size(idx, count) <= (n + 7) / 8 ? IndexCoding::kVarint : IndexCoding::kBitmap;
}

void decode_varint(const uint8_t* data, std::size_t size, std::size_t count, std::size_t n,
                   uint32_t* out) {
  std::size_t pos = 0;
  uint64_t prev = 0;
  for (std::size_t i = 0; i < count; ++i) {
    uint64_t v = 0;
    int shift = 0;
    std::size_t start = pos;
    while (true) {
      if (pos >= size) throw InvalidArgument("index stream truncated");
      uint8_t byte = data[pos++];
      if (shift == 28 && (byte & 0xf0))
        throw InvalidArgument("index varint overflows 32 bits");
      v |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) {
        if (byte == 0 && pos - start > 1) throw InvalidArgument("index varint not minimal");
        break;
      }
      shift += 7;
    }
    uint64_t idx;
    if (i == 0) {
      idx = v;
    } else {
      if (v == 0) throw InvalidArgument("indices not strictly increasing (duplicate)");
      idx = prev + v;
    }
    if (idx >= n) throw InvalidArgument("index out of range");
    out[i] = static_cast<uint32_t>(idx);
    prev = idx;
  }
  if (pos != size) throw InvalidArgument("trailing bytes after index stream");
}

void decode_bitmap(const uint8_t* data, std::size_t size, std::size_t count, std::size_t n,
                   uint32_t* out) {
  if (size != (n + 7) / 8) throw InvalidArgument("bitmap length does not match tensor size");
  if (n % 8 && (data[size - 1] >> (n % 8)))
    throw InvalidArgument("bitmap has bits set beyond the tensor size");
  std::size_t c = 0;
  for (std::size_t byte = 0; byte < size; ++byte) {
    uint32_t v = data[byte];
    while (v) {
      int bit = __builtin_ctz(v);
      v &= v - 1;
      if (c >= count) throw InvalidArgument("bitmap has more entries than declared");
      out[c++] = static_cast<uint32_t>(byte * 8 + bit);
    }
  }
  if (c != count) throw InvalidArgument("bitmap has fewer entries than declared");
}

// ---------------------------------------------------------------------------------
// int4 / int8 block quantization.
// ---------------------------------------------------------------------------------
void pack_int4(const int8_t* q, std::size_t n, uint8_t* packed) {
  auto sat = [](int8_t v) { return static_cast<uint8_t>(std::clamp<int>(v, -8, 7) & 0x0f); };
  for (std::size_t i = 0; i + 1 < n; i += 2)
    packed[i / 2] = static_cast<uint8_t>(sat(q[i]) | (sat(q[i + 1]) << 4));
  if (n % 2) packed[n / 2] = sat(q[n - 1]);
}

void unpack_int4(const uint8_t* packed, std::size_t n, int8_t* q) {
  for (std::size_t i = 0; i < n; ++i) {
    uint8_t nib = (packed[i / 2] >> ((i & 1) * 4)) & 0x0f;
    q[i] = static_cast<int8_t>(static_cast<int8_t>(nib << 4) >> 4);  // sign-extend
  }
}

namespace {
template <class Store>
void quantize_blocks(const float* x, std::size_t n, std::size_t block, float qmax, float* scales,
                     int threads, Store&& store) {
  const std::size_t nb = (n + block - 1) / block;
  int t = effective_threads(n, threads);
  std::vector<char> ok(t, 1);
  // Parallel over blocks; `align` keeps int4 byte pairs inside one thread (block even or
  // one block per range).
  parallel_for(nb, effective_threads(nb, t, 1), 1, [&](std::size_t b0, std::size_t b1, int p) {
    for (std::size_t bl = b0; bl < b1; ++bl) {
      std::size_t b = bl * block, e = std::min(n, b + block);
      float amax = 0.0f;
      for (std::size_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(x[i]));
      if (!(amax < std::numeric_limits<float>::infinity())) {
        ok[p] = 0;
        return;
      }
      float s = amax / qmax;
      scales[bl] = s;
      for (std::size_t i = b; i < e; ++i) {
        float c = s == 0.0f ? 0.0f : std::clamp(x[i] / s, -qmax - 1.0f, qmax);
        store(i, static_cast<int8_t>(round_even(c)));
      }
    }
  });
  for (char c : ok)
    if (!c) throw InvalidArgument("quantize input contains NaN or Inf");
}
}  // namespace

void quantize_int8_blocks(const float* x, std::size_t n, std::size_t block, int8_t* q,
                          float* scales, int threads) {
  quantize_blocks(x, n, block, 127.0f, scales, threads, [&](std::size_t i, int8_t v) {
    q[i] = std::max<int8_t>(v, -127);
  });
}

void quantize_int4_blocks(const float* x, std::size_t n, std::size_t block, uint8_t* packed,
                          float* scales, int threads) {
  // Nibbles of one byte may belong to two blocks when the block is odd: quantise into a
  // temporary int8 buffer first, then pack (keeps the threaded loop race-free).
  std::vector<int8_t> q(n);
  quantize_blocks(x, n, block, 7.0f, scales, threads, [&](std::size_t i, int8_t v) { q[i] = v; });
  pack_int4(q.data(), n, packed);
}

void dequantize_int4_blocks(const uint8_t* packed, std::size_t n, std::size_t block,
                            const float* scales, float* out, int threads) {
  parallel_for(n, effective_threads(n, threads), 2, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t i = b; i < e; ++i) {
      uint8_t nib = (packed[i / 2] >> ((i & 1) * 4)) & 0x0f;
      int8_t v = static_cast<int8_t>(static_cast<int8_t>(nib << 4) >> 4);
      out[i] = static_cast<float>(v) * scales[i / block];
    }
  });
}

}  // namespace edgefed
