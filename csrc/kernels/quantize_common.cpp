// Everything above the per-ISA kernels: ISA dispatch, scale rules, the stochastic-rounding
// kernel, and the drivers that walk a layout and split it across threads. Each element's
// result depends only on its value, its scale and its flat index, and min / max reductions
// are exact, so every thread count and every ISA gives identical bytes.
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "quantize.h"

namespace edgefed::quant {

// Elements per extra thread: a thread is started (and joined) per call, which costs tens of
// microseconds on an idle machine and up to a scheduler time slice on a loaded one, so each
// thread must get at least ~0.1 ms of streaming work (256K floats = 1 MB) to pay off.
constexpr std::size_t kMinPerThread = std::size_t{1} << 18;
constexpr std::size_t kPrefetchFloats = 1024;

// Threads for n elements when the caller asked for `requested` (0 = all cores). Like
// common.h's effective_threads, but the core count is read once: hardware_concurrency()
// parses /sys on Linux, which cost ~20 us per call, more than quantizing 10K floats.
static int threads_for(std::size_t n, int requested) {
  static const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::size_t t = static_cast<std::size_t>(requested <= 0 ? hw : requested);
  return static_cast<int>(std::max<std::size_t>(1, std::min(t, n / kMinPerThread)));
}

// ---------------------------------------------------------------- dispatch
Isa parse_isa(const std::string& name) {
  if (name == "auto") return Isa::Auto;
  if (name == "generic") return Isa::Generic;
  if (name == "sse2") return Isa::Sse2;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  if (name == "neon") return Isa::Neon;
  throw InvalidArgument("unknown isa '" + name +
                        "' (expected auto, generic, sse2, avx2, avx512 or neon)");
}

static const CpuFeatures& features() {
  static const CpuFeatures f = detect_cpu_features();  // read-only after first use
  return f;
}

bool isa_available(Isa isa) {
  const CpuFeatures& f = features();
  switch (isa) {
    case Isa::Auto:
    case Isa::Generic:
      return true;
#if defined(EDGEFED_X86)
    case Isa::Sse2:
      return f.sse2;
    case Isa::Avx2:
      return f.avx2;
    case Isa::Avx512:
      return f.avx512;
#endif
#if defined(EDGEFED_ARM64)
    case Isa::Neon:
      return f.neon;
#endif
    default:
      return false;
  }
}

static Isa best_isa() {
#if defined(EDGEFED_X86)
  if (isa_available(Isa::Avx512)) return Isa::Avx512;
  if (isa_available(Isa::Avx2)) return Isa::Avx2;
  return Isa::Sse2;
#elif defined(EDGEFED_ARM64)
  return Isa::Neon;
#else
  return Isa::Generic;
#endif
}

const char* best_isa_name() { return select_kernels(Isa::Auto).name; }

const Kernels& select_kernels(Isa isa) {
  if (isa == Isa::Auto) isa = best_isa();
  require(isa_available(isa), "the requested isa is not supported by this CPU or build");
  switch (isa) {
#if defined(EDGEFED_X86)
    case Isa::Sse2:
      return kernels_sse2();
    case Isa::Avx2:
      return kernels_avx2();
    case Isa::Avx512:
      return kernels_avx512();
#endif
#if defined(EDGEFED_ARM64)
    case Isa::Neon:
      return kernels_neon();
#endif
    default:
      return kernels_generic();
  }
}

// ---------------------------------------------------------------- scalar rules
std::size_t Layout::nscales() const {
  switch (gran) {
    case Granularity::PerTensor:
      return 1;
    case Granularity::PerAxis:
      return len;
    default:
      return outer * nblocks() * inner;
  }
}

void check_size(std::size_t numel) {
  require(numel <= kMaxElements, "tensor has " + std::to_string(numel) +
                                     " elements; at most 2^31 (2147483648) are supported");
}

void params_from_range(float mn, float mx, bool symmetric, float qmin, float qmax, float* scale,
                       float* zp) {
  if (symmetric) {
    const float amax = std::max(-mn, mx);
    float s = amax / qmax;
    *scale = (s > 0.f && std::isfinite(s)) ? s : 1.f;
    *zp = 0.f;
    return;
  }
  mn = std::min(mn, 0.f);  // the range must contain 0 (ONNX DynamicQuantizeLinear)
  mx = std::max(mx, 0.f);
  float s = (mx - mn) / (qmax - qmin);
  if (!std::isfinite(s))  // mx - mn overflowed float: compute the same quotient in double
    s = static_cast<float>((static_cast<double>(mx) - mn) / (qmax - qmin));
  if (!(s > 0.f)) s = 1.f;  // zero range (or underflow): any scale represents it; use 1
  const float z = qmin - mn / s;
  *scale = s;
  *zp = std::nearbyint(std::min(std::max(z, qmin), qmax));
}

namespace {
inline std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline std::uint32_t lowbias32(std::uint32_t x) {  // Wellons' 32-bit mixer
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
// Scalar reference of the hash the kernels vectorise (quantize_impl.h, Impl::mix).
struct Rng {
  std::uint32_t k0, k1;
  explicit Rng(std::uint64_t seed) {
    const std::uint64_t z = splitmix64(seed);
    k0 = static_cast<std::uint32_t>(z), k1 = static_cast<std::uint32_t>(z >> 32);
  }
  float uniform(std::uint32_t index) const {
    const std::uint32_t h = lowbias32(lowbias32(index ^ k0) + k1);
    return static_cast<float>(h >> 8) * 0x1p-24f;  // 24 bits: exact in float, < 1
  }
};

// Work splitting. Threads are started per call (no pool: no global state), but the caller
// never waits for a helper the OS has not scheduled yet (on a loaded machine that wait is a
// whole time slice): the work is cut into chunks claimed from a shared counter, the caller
// claims chunks too, and a helper that starts late finds nothing left and exits on its own
// (it is detached and owns the counter through a shared_ptr; it touches the caller's data
// only for a chunk it claimed, and the caller waits until every claimed chunk is done).
// Which worker ran which chunk never changes a result.
template <class Fn>
void split_work(std::size_t nitems, std::size_t item_elems, int threads, std::size_t align,
                Fn&& fn) {
  if (nitems == 0) return;
  item_elems = std::max<std::size_t>(1, item_elems);
  std::size_t chunk = std::max((kMinPerThread / 2 + item_elems - 1) / item_elems,
                               (nitems + 4 * threads - 1) / (4 * threads));
  chunk = (chunk + align - 1) / align * align;
  const std::size_t nchunks = (nitems + chunk - 1) / chunk;
  if (threads <= 1 || nchunks <= 1) {
    fn(std::size_t{0}, nitems, 0);
    return;
  }
  struct Shared {
    std::atomic<std::size_t> next{0}, done{0};
    std::size_t nchunks = 0;
    std::mutex mutex;
    std::exception_ptr error;
    std::function<void(std::size_t, int)> run;  // refers to the caller's frame
  };
  auto shared = std::make_shared<Shared>();
  shared->nchunks = nchunks;
  shared->run = [&](std::size_t c, int worker) {
    fn(c * chunk, std::min(nitems, (c + 1) * chunk), worker);
  };
  auto work = [](Shared& sh, int worker) {
    for (;;) {
      const std::size_t c = sh.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= sh.nchunks) return;
      try {
        sh.run(c, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(sh.mutex);
        if (!sh.error) sh.error = std::current_exception();
      }
      sh.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int w = 1; w < threads; ++w) {
    try {
      std::thread([shared, work, w] { work(*shared, w); }).detach();
    } catch (const std::system_error&) {
      break;  // no more threads available: the caller does the rest
    }
  }
  work(*shared, 0);
  while (shared->done.load(std::memory_order_acquire) < nchunks) std::this_thread::yield();
  if (shared->error) std::rethrow_exception(shared->error);
}

// Walks the layout in segments that share one scale (vec = false: scale[sidx]) or that have
// one scale per element (vec = true: scale[sidx + i]); seg returns true on NaN / Inf.
template <class Seg>
bool drive(const Layout& L, int threads, Seg&& seg) {
  std::atomic<bool> bad{false};
  auto mark = [&](bool b) {
    if (b) bad.store(true, std::memory_order_relaxed);
  };
  const std::size_t n = L.numel(), len = L.len, inner = L.inner;
  const int t = threads_for(n, threads);
  if (L.gran == Granularity::PerTensor) {
    split_work(n, 1, t, 64, [&](std::size_t b, std::size_t e, int) { mark(seg(b, e - b, 0, false)); });
  } else if (L.gran == Granularity::PerAxis && inner > 1) {
    split_work(L.outer * len, inner, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t r = b; r < e; ++r) mark(seg(r * inner, inner, r % len, false));
    });
  } else if (L.gran == Granularity::PerAxis) {
    split_work(L.outer, len, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t o = b; o < e; ++o) mark(seg(o * len, len, 0, true));
    });
  } else if (inner == 1) {
    const std::size_t nb = L.nblocks(), B = L.block;
    split_work(L.outer * nb, B, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t k = b; k < e; ++k) {
        const std::size_t o = k / nb, j = k % nb;
        mark(seg(o * len + j * B, std::min(B, len - j * B), k, false));
      }
    });
  } else {
    const std::size_t nb = L.nblocks(), B = L.block;
    split_work(L.outer * len, inner, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t r = b; r < e; ++r) {
        const std::size_t o = r / len, a = r % len;
        mark(seg(r * inner, inner, (o * nb + a / B) * inner, true));
      }
    });
  }
  return bad.load();
}

constexpr float kInf = std::numeric_limits<float>::infinity();
}  // namespace

std::int64_t first_nonfinite(const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return static_cast<std::int64_t>(i);
  return -1;
}

// ---------------------------------------------------------------- drivers
bool quantize(const Kernels& k, const float* x, const Layout& lay, const float* scale,
              const float* zp, const QuantParams& p, std::uint8_t* out, int threads,
              bool allow_nonfinite, std::int64_t* bad_index) {
  const Rng rng(p.seed);
  const bool bad = drive(lay, threads, [&](std::size_t off, std::size_t len, std::size_t si,
                                           bool vec) {
    if (p.stochastic)
      return k.stoch(x + off, len, static_cast<std::uint32_t>(off), scale + si, zp + si, vec,
                     p.qmin, p.qmax, rng.k0, rng.k1, out + off);
    if (vec) return k.quant_vec(x + off, len, scale + si, zp + si, p.qmin, p.qmax, out + off);
    return k.quant(x + off, len, scale[si], zp[si], p.qmin, p.qmax, out + off);
  });
  if (bad && !allow_nonfinite) {
    *bad_index = first_nonfinite(x, lay.numel());
    return false;
  }
  return true;
}

bool compute_scales(const Kernels& k, const float* x, const Layout& L, bool symmetric,
                    float qmin, float qmax, float* scale, float* zp, int threads,
                    std::int64_t* bad_index) {
  std::atomic<bool> bad{false};
  auto mark = [&](bool b) {
    if (b) bad.store(true, std::memory_order_relaxed);
  };
  const std::size_t n = L.numel(), len = L.len, inner = L.inner;
  const int t = threads_for(n, threads);
  if (L.gran == Granularity::PerTensor) {
    std::vector<float> mn(t, kInf), mx(t, -kInf);
    split_work(n, 1, t, 64, [&](std::size_t b, std::size_t e, int part) {
      float lo, hi;
      mark(k.minmax(x + b, e - b, &lo, &hi));
      mn[part] = std::min(mn[part], lo), mx[part] = std::max(mx[part], hi);
    });
    const float lo = *std::min_element(mn.begin(), mn.end());
    const float hi = *std::max_element(mx.begin(), mx.end());
    params_from_range(lo, hi, symmetric, qmin, qmax, scale, zp);
  } else if (L.gran == Granularity::PerAxis && inner > 1) {
    split_work(len, L.outer * inner, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t a = b; a < e; ++a) {
        float lo = kInf, hi = -kInf;
        for (std::size_t o = 0; o < L.outer; ++o) {
          float m1, m2;
          mark(k.minmax(x + (o * len + a) * inner, inner, &m1, &m2));
          lo = std::min(lo, m1), hi = std::max(hi, m2);
        }
        params_from_range(lo, hi, symmetric, qmin, qmax, scale + a, zp + a);
      }
    });
  } else if (L.gran == Granularity::PerAxis) {
    std::vector<float> mn(static_cast<std::size_t>(t) * len, kInf), mx(mn.size(), -kInf);
    split_work(L.outer, len, t, 1, [&](std::size_t b, std::size_t e, int part) {
      float* pmn = mn.data() + part * len;
      float* pmx = mx.data() + part * len;
      for (std::size_t o = b; o < e; ++o) mark(k.minmax_cols(x + o * len, len, pmn, pmx));
    });
    for (std::size_t a = 0; a < len; ++a) {
      float lo = kInf, hi = -kInf;
      for (int part = 0; part < t; ++part)
        lo = std::min(lo, mn[part * len + a]), hi = std::max(hi, mx[part * len + a]);
      params_from_range(lo, hi, symmetric, qmin, qmax, scale + a, zp + a);
    }
  } else {
    // Blocked: the fused driver with no output computes exactly these scales.
    QuantParams p;
    p.qmin = qmin, p.qmax = qmax;
    return quantize_dynamic(k, x, L, symmetric, p, scale, zp, nullptr, threads, bad_index);
  }
  if (bad.load()) {
    *bad_index = first_nonfinite(x, n);
    return false;
  }
  return true;
}

bool quantize_dynamic(const Kernels& k, const float* x, const Layout& L, bool symmetric,
                      const QuantParams& p, float* scale, float* zp, std::uint8_t* out,
                      int threads, std::int64_t* bad_index) {
  if (L.gran != Granularity::Blocked) {
    if (!compute_scales(k, x, L, symmetric, p.qmin, p.qmax, scale, zp, threads, bad_index))
      return false;
    return quantize(k, x, L, scale, zp, p, out, threads, true, bad_index);
  }
  // Fused block path: each block's min / max and its quantization touch the same cache lines.
  std::atomic<bool> bad{false};
  auto mark = [&](bool b) {
    if (b) bad.store(true, std::memory_order_relaxed);
  };
  const Rng rng(p.seed);
  const std::size_t n = L.numel(), len = L.len, inner = L.inner, nb = L.nblocks(), B = L.block;
  const int t = threads_for(n, threads);
  if (inner == 1) {
    split_work(L.outer * nb, B, t, 1, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t blk = b; blk < e; ++blk) {
        const std::size_t o = blk / nb, j = blk % nb, off = o * len + j * B;
        const std::size_t m = std::min(B, len - j * B);
        float lo, hi;
        // Keep memory busy while this block is quantized from L1: request the lines of a
        // block ~4 KB ahead (the hardware prefetcher alone stalls between the two phases).
        const float* ahead = x + off + kPrefetchFloats;
        if (ahead + B <= x + n)
          for (std::size_t c = 0; c < B; c += 16) __builtin_prefetch(ahead + c);
        mark(k.minmax(x + off, m, &lo, &hi));
        params_from_range(lo, hi, symmetric, p.qmin, p.qmax, scale + blk, zp + blk);
        if (!out) continue;
        if (p.stochastic)
          k.stoch(x + off, m, static_cast<std::uint32_t>(off), scale + blk, zp + blk, false,
                  p.qmin, p.qmax, rng.k0, rng.k1, out + off);
        else
          k.quant(x + off, m, scale[blk], zp[blk], p.qmin, p.qmax, out + off);
      }
    });
  } else {
    split_work(L.outer * nb, B * inner, t, 1, [&](std::size_t b, std::size_t e, int) {
      std::vector<float> lo(inner), hi(inner);
      for (std::size_t blk = b; blk < e; ++blk) {
        const std::size_t o = blk / nb, j = blk % nb;
        const std::size_t a0 = j * B, a1 = std::min(len, a0 + B);
        const float* first = x + (o * len + a0) * inner;
        std::copy(first, first + inner, lo.begin());
        std::copy(first, first + inner, hi.begin());
        for (std::size_t a = a0; a < a1; ++a)
          mark(k.minmax_cols(x + (o * len + a) * inner, inner, lo.data(), hi.data()));
        float* s = scale + blk * inner;
        float* z = zp + blk * inner;
        for (std::size_t i = 0; i < inner; ++i)
          params_from_range(lo[i], hi[i], symmetric, p.qmin, p.qmax, s + i, z + i);
        if (!out) continue;
        for (std::size_t a = a0; a < a1; ++a) {
          const std::size_t off = (o * len + a) * inner;
          if (p.stochastic)
            k.stoch(x + off, inner, static_cast<std::uint32_t>(off), s, z, true, p.qmin, p.qmax,
                    rng.k0, rng.k1, out + off);
          else
            k.quant_vec(x + off, inner, s, z, p.qmin, p.qmax, out + off);
        }
      }
    });
  }
  if (bad.load()) {
    *bad_index = first_nonfinite(x, n);
    return false;
  }
  return true;
}

void dequantize(const Kernels& k, const std::uint8_t* q, bool is_signed, const Layout& lay,
                const float* scale, const float* zp, float* out, int threads) {
  drive(lay, threads, [&](std::size_t off, std::size_t len, std::size_t si, bool vec) {
    if (vec)
      k.dequant_vec(q + off, len, is_signed, scale + si, zp + si, out + off);
    else
      k.dequant(q + off, len, is_signed, scale[si], zp[si], out + off);
    return false;
  });
}

float stochastic_uniform(std::uint64_t seed, std::uint32_t index) {
  return Rng(seed).uniform(index);
}

void stochastic_keys(std::uint64_t seed, std::uint32_t* k0, std::uint32_t* k1) {
  const Rng r(seed);
  *k0 = r.k0, *k1 = r.k1;
}

}  // namespace edgefed::quant
