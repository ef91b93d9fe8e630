// Top-k, error feedback, index coding and int4 packing (portable C++; the hot loops are
// simple enough for the compiler to vectorise at the baseline ISA).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
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

// Strided random sample of magnitudes in runs of 16 consecutive floats (one cache line):
// s / 16 runs, one drawn uniformly inside each of s / 16 equal strides, so the sample
// covers the whole vector (robust to sorted data) at one cache miss per 16 samples.
// Consecutive values may be correlated; that only widens the spread of the sampled
// threshold, and every caller verifies its count (and falls back) anyway.
std::vector<uint32_t> sample_mags(const float* x, std::size_t n, std::size_t s, uint64_t seed) {
  constexpr std::size_t kRun = 16;
  const std::size_t runs = std::max<std::size_t>(1, s / kRun);
  std::vector<uint32_t> out(runs * kRun);
  uint64_t st = seed ^ 0x5eed5eedull;
  const uint64_t stride = n / runs;  // callers guarantee n >= s, so stride >= kRun
  for (std::size_t r = 0; r < runs; ++r) {
    uint64_t off = ((splitmix(st) & 0xffffffffull) * (stride - kRun + 1)) >> 32;
    const float* p = x + r * stride + off;
    for (std::size_t j = 0; j < kRun; ++j) out[r * kRun + j] = mag_bits(p[j]);
  }
  return out;
}

// r-th largest (1-based) of v (reorders v).
uint32_t kth_largest(std::vector<uint32_t>& v, std::size_t r) {
  std::nth_element(v.begin(), v.begin() + (r - 1), v.end(), std::greater<uint32_t>());
  return v[r - 1];
}

// The r-th largest (1-based) of v for several ranks at once, without reordering v: one
// 1024-bin histogram of the top 10 magnitude bits finds each rank's bin, and only that bin's
// members are selected from (a few hundred for a 65536-sample: ~4x faster than a full
// nth_element). Any distribution stays exact: a crowded bin just costs more.
std::vector<uint32_t> ranked(const std::vector<uint32_t>& v, const std::vector<std::size_t>& rs) {
  std::vector<uint32_t> hist(1024, 0);  // magnitudes are < 2^31
  for (uint32_t m : v) ++hist[m >> 21];
  std::vector<uint32_t> out;
  for (std::size_t r : rs) {
    std::size_t above = 0, bin = 1024;
    while (bin > 0 && above + hist[bin - 1] < r) above += hist[--bin];
    const uint32_t b = static_cast<uint32_t>(bin - 1);
    std::vector<uint32_t> members;
    members.reserve(hist[b]);
    for (uint32_t m : v)
      if ((m >> 21) == b) members.push_back(m);
    out.push_back(kth_largest(members, r - above));
  }
  return out;
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
                      IndexVec& out, ValueVec& vals) {
  int t = pick_threads(n, threads);
  std::vector<std::unique_ptr<uint32_t[]>> parts(t);
  std::vector<std::unique_ptr<float[]>> vparts(t);
  std::vector<std::size_t> counts(t, 0);
  std::atomic<bool> overflow{false};
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    parts[p].reset(new uint32_t[cap + 16]);
    vparts[p].reset(new float[cap + 16]);
    uint32_t* buf = parts[p].get();
    float* vbuf = vparts[p].get();
    std::size_t c = 0, i = b;
    for (; i + 16 <= e; i += 16) {
      uint32_t mask = mask16_at_least(x + i, L);
      while (mask) {
        const std::size_t j = i + __builtin_ctz(mask);
        buf[c] = static_cast<uint32_t>(j);
        vbuf[c++] = x[j];
        mask &= mask - 1;
      }
      if (c > cap) {
        overflow.store(true, std::memory_order_relaxed);
        return;
      }
    }
    for (; i < e; ++i)
      if (mag_bits(x[i]) >= L) {
        buf[c] = static_cast<uint32_t>(i);
        vbuf[c++] = x[i];
      }
    if (c > cap) overflow.store(true, std::memory_order_relaxed);
    counts[p] = c;
  });
  if (overflow.load()) return false;
  std::size_t total = 0;
  for (std::size_t c : counts) total += c;
  if (total > cap) return false;
  out.resize(total);
  vals.resize(total);
  std::size_t o = 0;
  for (int p = 0; p < t; ++p) {
    if (counts[p]) {
      std::memcpy(out.data() + o, parts[p].get(), counts[p] * sizeof(uint32_t));
      std::memcpy(vals.data() + o, vparts[p].get(), counts[p] * sizeof(float));
    }
    o += counts[p];
  }
  return true;
}

// One threaded pass that splits |x| >= L into "definite" (|x| >= H: certainly in the
// top-k when the sample bounds hold) and "band" (L <= |x| < H: to be decided), kept per
// thread: part p covers an index range below part p + 1's, so the parts in order are in
// index order. They are read in place (no concatenated copies: at k = 1% of 10M, every
// extra candidate-sized array cost ~0.2 ms of fresh-page faults per call). Branch-free
// inner loop: each candidate is written to both buffers and only one counter advances.
struct Part {
  std::unique_ptr<uint32_t[]> di, bi;
  std::unique_ptr<float[]> dv, bv;
  std::size_t cd = 0, cb = 0;
};

bool collect_band(const float* x, std::size_t n, uint32_t L, uint32_t H, std::size_t cap_def,
                  std::size_t cap_band, int threads, std::vector<Part>& parts) {
  int t = pick_threads(n, threads);
  parts.clear();
  parts.resize(t);
  std::atomic<bool> overflow{false};
  parallel_for(n, t, 4096, [&](std::size_t b, std::size_t e, int p) {
    Part& B = parts[p];
    B.di.reset(new uint32_t[cap_def + 17]);
    B.dv.reset(new float[cap_def + 17]);
    B.bi.reset(new uint32_t[cap_band + 17]);
    B.bv.reset(new float[cap_band + 17]);
    uint32_t *di = B.di.get(), *bi = B.bi.get();
    float *dv = B.dv.get(), *bv = B.bv.get();
    std::size_t cd = 0, cb = 0, i = b;
    auto put = [&](std::size_t j) {
      const float v = x[j];
      const std::size_t is_def = mag_bits(v) >= H;
      di[cd] = static_cast<uint32_t>(j);
      dv[cd] = v;
      bi[cb] = static_cast<uint32_t>(j);
      bv[cb] = v;
      cd += is_def;
      cb += 1 - is_def;
    };
    for (; i + 16 <= e; i += 16) {
      uint32_t mask = mask16_at_least(x + i, L);
      while (mask) {
        put(i + __builtin_ctz(mask));
        mask &= mask - 1;
      }
      if (cd > cap_def || cb > cap_band) {
        overflow.store(true, std::memory_order_relaxed);
        return;
      }
    }
    for (; i < e; ++i)
      if (mag_bits(x[i]) >= L) put(i);
    if (cd > cap_def || cb > cap_band) overflow.store(true, std::memory_order_relaxed);
    B.cd = cd;
    B.cb = cb;
  });
  return !overflow.load();
}

// From candidates (index order, containing the top-k, with their values), keep exactly
// the top k. Works on the candidate arrays only: no gathers from x.
TopK select_from_candidates(const std::vector<uint32_t>& cand, const std::vector<float>& cv,
                            std::size_t k) {
  std::vector<uint32_t> mags(cand.size());
  uint32_t worst = 0;
  for (std::size_t i = 0; i < cand.size(); ++i) {
    mags[i] = mag_bits(cv[i]);
    worst = std::max(worst, mags[i]);
  }
  if (worst >= kInfBits) throw_nonfinite();
  TopK r;
  if (k == 0) return r;
  std::vector<uint32_t> tmp(mags);
  const uint32_t T = kth_largest(tmp, k);
  std::size_t gt = 0;
  for (uint32_t m : mags) gt += m > T;
  std::size_t ties = k - gt;
  r.indices.resize(k);
  r.values.resize(k);
  std::size_t o = 0;
  for (std::size_t i = 0; i < cand.size() && o < k; ++i) {
    const uint32_t m = mags[i];
    const bool take = m > T || (m == T && ties > 0);
    ties -= (m == T && take);
    r.indices[o] = cand[i];
    r.values[o] = cv[i];
    o += take;  // branch-free: overwritten unless taken
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
  return select_from_candidates(all, std::vector<float>(x, x + n), k);
}

}  // namespace

bool all_finite(const float* x, std::size_t n, int threads) {
  int t = pick_threads(n, threads);
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
  int t = pick_threads(n, threads);
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
  // Sample ranks 5 binomial standard deviations (+ slack) either side of the expected
  // rank: L is below the k-th magnitude and H above it unless the sample is off by more
  // than that; both cases are detected from the counts and fall back to the radix path
  // (exact for any input, only slower).
  const double dev = 5.0 * std::sqrt(sp) + 0.02 * sp + 8.0;
  const double r_lo = sp + dev, r_hi = sp - dev;
  if (r_lo >= 0.5 * s) return topk_radix(x, n, k, threads);
  std::vector<uint32_t> smp = sample_mags(x, n, s, 0x70b4c0ffeeull ^ n);
  const std::size_t lo = static_cast<std::size_t>(r_lo);
  const std::size_t hi = r_hi >= 1.0 ? static_cast<std::size_t>(r_hi) : 0;
  const std::vector<uint32_t> q = ranked(smp, hi ? std::vector<std::size_t>{lo, hi}
                                                 : std::vector<std::size_t>{lo});
  const uint32_t L = q[0];
  const uint32_t H = hi ? q[1] : kInfBits;
  if (L >= kInfBits) return topk_radix(x, n, k, threads);  // NaN/Inf: radix reports it
  // Expected sizes ~ n * rank / s; allow 3x (+ slack) before giving up on this path.
  const std::size_t cap_def = std::min<std::size_t>(k, static_cast<std::size_t>(n * p) + 1024);
  const std::size_t cap_band = static_cast<std::size_t>(3.0 * (r_lo - r_hi) / s * n) + 4096;
  std::vector<Part> parts;
  if (!collect_band(x, n, L, std::max(H, L), cap_def, cap_band, threads, parts))
    return topk_radix(x, n, k, threads);
  const int t = static_cast<int>(parts.size());
  std::size_t n_def = 0, n_band = 0;
  for (const Part& P : parts) n_def += P.cd, n_band += P.cb;
  if (n_def > k || n_def + n_band < k) return topk_radix(x, n, k, threads);
  // The band's share: its (k - n_def) largest magnitudes, ties to the lowest indices.
  const std::size_t want = k - n_def;
  uint32_t T = kInfBits;
  std::vector<std::size_t> gt(t, 0), eq(t, 0), take(t, 0), off(t + 1, 0);
  if (want > 0) {
    // T = the want-th largest band magnitude, from a 2048-bin histogram of (m - L) over
    // the band's range [L, H) per part (no gathered copy, no full selection), then a
    // selection among the members of T's bin only. Per-part counts of m > T and m == T
    // follow from the same histograms plus that bin's members.
    const uint32_t HB = std::max(H, L + 1);
    unsigned shift = 0;
    while (((HB - L - 1) >> shift) >= 2048) ++shift;
    std::vector<std::vector<uint32_t>> hist(t, std::vector<uint32_t>(2048, 0));
    for (int p = 0; p < t; ++p)
      for (std::size_t i = 0; i < parts[p].cb; ++i)
        ++hist[p][(mag_bits(parts[p].bv[i]) - L) >> shift];
    std::size_t above = 0, bin = 2048;
    auto total = [&](std::size_t j) {
      std::size_t c = 0;
      for (int p = 0; p < t; ++p) c += hist[p][j];
      return c;
    };
    while (bin > 0 && above + total(bin - 1) < want) above += total(--bin);
    const uint32_t tb = static_cast<uint32_t>(bin - 1);
    std::vector<uint32_t> members;
    for (int p = 0; p < t; ++p)
      for (std::size_t i = 0; i < parts[p].cb; ++i) {
        const uint32_t m = mag_bits(parts[p].bv[i]);
        if (((m - L) >> shift) == tb) members.push_back(m);
      }
    std::vector<uint32_t> sel(members);
    T = kth_largest(sel, want - above);
    std::size_t mi = 0;
    for (int p = 0; p < t; ++p) {
      for (std::size_t j = tb + 1; j < 2048; ++j) gt[p] += hist[p][j];
      for (std::size_t c = 0; c < hist[p][tb]; ++c, ++mi) {  // members are in part order
        gt[p] += members[mi] > T;
        eq[p] += members[mi] == T;
      }
    }
    std::size_t ties = want;
    for (int p = 0; p < t; ++p) ties -= gt[p];
    for (int p = 0; p < t; ++p) {  // ties go to the lowest indices: earlier parts first
      take[p] = std::min(eq[p], ties);
      ties -= take[p];
    }
  }
  for (int p = 0; p < t; ++p) off[p + 1] = off[p] + parts[p].cd + gt[p] + take[p];
  if (off[t] != k) throw std::logic_error("topk_exact: selected " + std::to_string(off[t]));
  // Each part merges its definite list with its selected band members into its own slice.
  TopK r;
  r.indices.resize(k);
  r.values.resize(k);
  parallel_for(static_cast<std::size_t>(t), t, 1, [&](std::size_t pb, std::size_t pe, int) {
    for (std::size_t p = pb; p < pe; ++p) {
      const Part& P = parts[p];
      std::size_t a = 0, b = 0, o = off[p], tk = take[p];
      uint32_t worst = 0;
      while (a < P.cd || b < P.cb) {
        if (b >= P.cb || (a < P.cd && P.di[a] < P.bi[b])) {
          worst = std::max(worst, mag_bits(P.dv[a]));
          r.indices[o] = P.di[a];
          r.values[o++] = P.dv[a++];
          continue;
        }
        const uint32_t m = mag_bits(P.bv[b]);
        if (m > T || (m == T && tk > 0)) {
          tk -= (m == T);
          r.indices[o] = P.bi[b];
          r.values[o++] = P.bv[b];
        }
        ++b;
      }
      if (worst >= kInfBits) throw_nonfinite();
    }
  });
  return r;
}

TopK topk_approx(const float* x, std::size_t n, std::size_t k, double tolerance, uint64_t seed,
                 int threads) {
  tolerance = std::max(0.0, tolerance);
  if (k == 0 || k >= n || n <= (1u << 16)) return topk_exact(x, n, k, threads);
  const double p = static_cast<double>(k) / static_cast<double>(n);
  std::size_t s = static_cast<std::size_t>(std::ceil(1000.0 / p));
  s = std::clamp<std::size_t>(s, 4096, std::max<std::size_t>(4096, n / 16));
  std::vector<uint32_t> smp = sample_mags(x, n, s, seed);
  s = smp.size();
  std::size_t r = std::max<std::size_t>(1, static_cast<std::size_t>(std::llround(s * p)));
  r = std::min(r, s);
  const uint32_t T = kth_largest(smp, r);
  const std::size_t band = static_cast<std::size_t>(std::ceil(tolerance * k));
  const std::size_t hi = k + band, lo = k > band ? k - band : 0;
  IndexVec cand;
  ValueVec cv;
  if (T < kInfBits && collect_at_least(x, n, T, hi, threads, cand, cv) && cand.size() >= lo &&
      cand.size() >= 1) {
    TopK out;
    out.indices = std::move(cand);
    out.values = std::move(cv);
    return out;
  }
  return topk_exact(x, n, k, threads);  // outside the band (or non-finite): exact path
}

void add_inplace_checked(float* residual, const float* update, std::size_t n, int threads) {
  int t = pick_threads(n, threads);
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
    uint64_t v;
    // Fast path for 1- and 2-byte varints (gaps < 16384: nearly all of them at the
    // densities top-k produces), decoded without a data-dependent branch. Anything
    // else (3+ bytes, a non-minimal 2-byte form, the end of the buffer) takes the
    // general loop below, which also produces the error messages.
    if (pos + 1 < size) {
      const uint32_t b0 = data[pos], b1 = data[pos + 1];
      const uint32_t two = b0 >> 7;
      if (!(two & ((b1 >> 7) | (b1 == 0)))) {
        v = (b0 & 0x7f) | (((b1 & 0x7f) << 7) * two);
        pos += 1 + two;
        goto have_value;
      }
    }
    {
      v = 0;
      int shift = 0;
      const std::size_t start = pos;
      while (true) {
        if (pos >= size) throw InvalidArgument("index stream truncated");
        const uint8_t byte = data[pos++];
        if (shift == 28 && (byte & 0xf0)) throw InvalidArgument("index varint overflows 32 bits");
        v |= static_cast<uint64_t>(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
          if (byte == 0 && pos - start > 1) throw InvalidArgument("index varint not minimal");
          break;
        }
        shift += 7;
      }
    }
  have_value:
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
  int t = pick_threads(n, threads);
  std::vector<char> ok(t, 1);
  // Parallel over blocks; `align` keeps int4 byte pairs inside one thread (block even or
  // one block per range).
  parallel_for(nb, pick_threads(nb, t, 1), 1, [&](std::size_t b0, std::size_t b1, int p) {
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
  parallel_for(n, pick_threads(n, threads), 2, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t i = b; i < e; ++i) {
      uint8_t nib = (packed[i / 2] >> ((i & 1) * 4)) & 0x0f;
      int8_t v = static_cast<int8_t>(static_cast<int8_t>(nib << 4) >> 4);
      out[i] = static_cast<float>(v) * scales[i / block];
    }
  });
}

}  // namespace edgefed
