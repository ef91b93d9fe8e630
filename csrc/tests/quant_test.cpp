// Standalone test of the quantization kernels, built natively (x86_64: generic, SSE2, AVX2,
// AVX-512 as available) and cross-built for aarch64 (generic, NEON; run under qemu-user) by
// tests/test_aarch64_neon.py. Checks, for every ISA:
//   1. quant_vectors.txt: onnxruntime's QuantizeLinear / DequantizeLinear outputs (made on
//      x86), for every prefix length and start offsets 0..3 (all tails, unaligned starts);
//   2. every kernel against an independent scalar reference written from the ONNX formula,
//      lengths 1..130;
//   3. the threaded drivers (all granularities, nearest and stochastic) against the generic
//      kernels, for 1 and 3 threads.
// It prints "digest <hex>" over all outputs: x86_64 and aarch64 must print the same value.
// Usage: quant_test <path to quant_vectors.txt>; exit status 0 only if all checks pass.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "quantize.h"

using namespace edgefed::quant;

namespace {

int failures = 0;
long checks = 0;
void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

float from_bits(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
std::uint32_t bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Independent reference: Saturate(RoundHalfToEven(x / s) + zp); NaN -> qmin (onnxruntime x86).
int ref_quant(float x, float s, int zp, int qmin, int qmax) {
  if (std::isnan(x)) return qmin;
  const float v = x / s;
  if (v >= 1e6f) return qmax;
  if (v <= -1e6f) return qmin;
  const long r = std::lrint(v) + zp;  // default rounding mode: nearest, ties to even
  return static_cast<int>(r < qmin ? qmin : (r > qmax ? qmax : r));
}
float ref_dequant(int q, float s, int zp) { return static_cast<float>(q - zp) * s; }

struct Fnv {
  std::uint64_t h = 1469598103934665603ull;
  void add(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
};

std::uint64_t rng_state = 0x1234567;
std::uint64_t next_u64() {
  std::uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
float next_float(float scale) {  // uniform-ish in [-150, 150) * scale, ties every 4th value
  const std::uint64_t r = next_u64();
  const int k = static_cast<int>(r % 300) - 150;
  if ((r >> 20) % 4 == 0) return (static_cast<float>(k) + 0.5f) * scale;
  return static_cast<float>(static_cast<double>(r >> 11) * 0x1p-53 * 300.0 - 150.0) * scale;
}

struct Case {
  char kind;
  bool is_signed;
  float scale;
  int zp;
  std::vector<float> x;        // Q: inputs,   D: expected outputs
  std::vector<std::uint8_t> q; // Q: expected, D: inputs
};

std::vector<Case> load_vectors(const char* path) {
  std::ifstream in(path);
  std::vector<Case> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream head(line);
    Case c;
    std::string dt, sbits;
    std::size_t n;
    head >> c.kind >> dt >> sbits >> c.zp >> n;
    c.is_signed = dt == "s8";
    c.scale = from_bits(static_cast<std::uint32_t>(std::stoul(sbits, nullptr, 16)));
    std::string l1, l2;
    std::getline(in, l1), std::getline(in, l2);
    const std::string& fl = c.kind == 'Q' ? l1 : l2;
    std::istringstream fs(fl), is(c.kind == 'Q' ? l2 : l1);
    for (std::size_t i = 0; i < n; ++i) {
      std::string h;
      long v;
      fs >> h, is >> v;
      c.x.push_back(from_bits(static_cast<std::uint32_t>(std::stoul(h, nullptr, 16))));
      c.q.push_back(static_cast<std::uint8_t>(v));
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

void test_vectors(const Kernels& k, const std::vector<Case>& cases, Fnv& d) {
  for (const Case& c : cases) {
    const float qmin = c.is_signed ? -128.f : 0.f, qmax = c.is_signed ? 127.f : 255.f;
    const std::size_t n = c.x.size();
    std::vector<std::uint8_t> q(n + 8);
    std::vector<float> y(n + 8);
    for (std::size_t off = 0; off < 4; ++off)
      for (std::size_t len = 1; off + len <= n; ++len) {
        if (c.kind == 'Q') {
          k.quant(c.x.data() + off, len, c.scale, float(c.zp), qmin, qmax, q.data());
          check(std::memcmp(q.data(), c.q.data() + off, len) == 0,
                std::string(k.name) + " vectors Q len " + std::to_string(len));
        } else {
          k.dequant(c.q.data() + off, len, c.is_signed, c.scale, float(c.zp), y.data());
          check(std::memcmp(y.data(), c.x.data() + off, len * 4) == 0,
                std::string(k.name) + " vectors D len " + std::to_string(len));
        }
      }
    if (c.kind == 'Q') d.add(q.data(), n - 3);
  }
}

void test_against_reference(const Kernels& k, Fnv& d) {
  rng_state = 99;
  for (std::size_t n = 1; n <= 130; ++n) {
    for (int sgn = 0; sgn < 2; ++sgn) {
      const bool is_signed = sgn == 1;
      const int qmin = is_signed ? -128 : 0, qmax = is_signed ? 127 : 255;
      std::vector<float> x(n), s(n), z(n), y(n), yv(n), mn(n), mx(n);
      std::vector<std::uint8_t> q(n), qv(n);
      for (std::size_t i = 0; i < n; ++i) {
        s[i] = 0.01f + static_cast<float>(next_u64() % 1000) * 1e-4f;
        z[i] = static_cast<float>(qmin + static_cast<int>(next_u64() % 256));
        x[i] = next_float(s[i]);
      }
      const float s0 = s[0];
      const int z0 = static_cast<int>(z[0]);
      const std::string tag = std::string(k.name) + " n=" + std::to_string(n);
      check(!k.quant(x.data(), n, s0, float(z0), float(qmin), float(qmax), q.data()), tag);
      check(!k.quant_vec(x.data(), n, s.data(), z.data(), float(qmin), float(qmax), qv.data()),
            tag);
      k.dequant(q.data(), n, is_signed, s0, float(z0), y.data());
      k.dequant_vec(qv.data(), n, is_signed, s.data(), z.data(), yv.data());
      for (std::size_t i = 0; i < n; ++i) {
        const int e = ref_quant(x[i], s0, z0, qmin, qmax);
        const int ev = ref_quant(x[i], s[i], static_cast<int>(z[i]), qmin, qmax);
        const int got = is_signed ? int(static_cast<std::int8_t>(q[i])) : int(q[i]);
        const int gotv = is_signed ? int(static_cast<std::int8_t>(qv[i])) : int(qv[i]);
        check(got == e, tag + " quant i=" + std::to_string(i));
        check(gotv == ev, tag + " quant_vec i=" + std::to_string(i));
        check(bits(y[i]) == bits(ref_dequant(got, s0, z0)), tag + " dequant");
        check(bits(yv[i]) == bits(ref_dequant(gotv, s[i], static_cast<int>(z[i]))),
              tag + " dequant_vec");
      }
      // stochastic rounding against floor(v) + [u < frac(v)], u from the scalar hash
      std::uint32_t k0, k1;
      stochastic_keys(77, &k0, &k1);
      std::vector<std::uint8_t> qs(n), qsv(n);
      check(!k.stoch(x.data(), n, 1000, &s0, z.data(), false, float(qmin), float(qmax), k0, k1,
                     qs.data()), tag + " stoch flag");
      k.stoch(x.data(), n, 1000, s.data(), z.data(), true, float(qmin), float(qmax), k0, k1,
              qsv.data());
      for (std::size_t i = 0; i < n; ++i) {
        for (int pass = 0; pass < 2; ++pass) {
          const float sc = pass ? s[i] : s0, zz = pass ? z[i] : z[0];
          float v = x[i] / sc;
          v = std::fmin(std::fmax(v, float(qmin) - zz), float(qmax) - zz);
          const float fl = std::floor(v);
          const float u = stochastic_uniform(77, static_cast<std::uint32_t>(1000 + i));
          const int e = static_cast<int>(fl + (u < v - fl ? 1.f : 0.f) + zz);
          const std::uint8_t got = pass ? qsv[i] : qs[i];
          check((is_signed ? int(static_cast<std::int8_t>(got)) : int(got)) == e,
                tag + " stoch i=" + std::to_string(i));
        }
      }
      d.add(qs.data(), n), d.add(qsv.data(), n);
      float lo, hi;
      check(!k.minmax(x.data(), n, &lo, &hi), tag + " minmax flag");
      float rlo = x[0], rhi = x[0];
      for (float v : x) rlo = std::fmin(rlo, v), rhi = std::fmax(rhi, v);
      check(lo == rlo && hi == rhi, tag + " minmax");
      std::copy(s.begin(), s.end(), mn.begin());
      std::copy(s.begin(), s.end(), mx.begin());
      check(!k.minmax_cols(x.data(), n, mn.data(), mx.data()), tag + " cols flag");
      for (std::size_t i = 0; i < n; ++i)
        check(mn[i] == std::fmin(s[i], x[i]) && mx[i] == std::fmax(s[i], x[i]), tag + " cols");
      x[n - 1] = std::nanf("");  // the last element is always in the tail
      check(k.quant(x.data(), n, s0, float(z0), float(qmin), float(qmax), q.data()),
            tag + " nan flag");
      check(k.minmax(x.data(), n, &lo, &hi), tag + " minmax nan flag");
      d.add(q.data(), n), d.add(qv.data(), n), d.add(y.data(), 4 * n), d.add(yv.data(), 4 * n);
    }
  }
}

void test_drivers(const Kernels& k, Fnv& d) {
  const std::size_t outer = 12, len = 1301, inner = 37, n = outer * len * inner;  // > 2 x 256K
  rng_state = 7;
  std::vector<float> x(n);
  for (float& v : x) v = next_float(0.02f);
  const Kernels& g = kernels_generic();
  for (int gi = 0; gi < 5; ++gi) {
    Layout L;
    if (gi == 0) L.inner = n;
    if (gi >= 1) L.outer = outer, L.len = len, L.inner = inner, L.gran = Granularity::PerAxis;
    if (gi == 2) L.outer = outer * len, L.len = inner, L.inner = 1;  // last axis
    if (gi == 3) L.gran = Granularity::Blocked, L.block = 64;
    if (gi == 4)
      L.gran = Granularity::Blocked, L.outer = outer * len, L.len = inner, L.inner = 1,
      L.block = 16;
    for (int mode = 0; mode < 3; ++mode) {  // symmetric s8, asymmetric u8, stochastic s8
      QuantParams p;
      if (mode == 1) p.qmin = 0.f, p.qmax = 255.f;
      p.stochastic = mode == 2, p.seed = 11;
      std::vector<float> s0(L.nscales()), z0(L.nscales()), y0(n), s1, z1, y1(n);
      std::vector<std::uint8_t> q0(n), q1(n);
      std::int64_t bad = -1;
      quantize_dynamic(g, x.data(), L, mode != 1, p, s0.data(), z0.data(), q0.data(), 1, &bad);
      dequantize(g, q0.data(), mode != 1, L, s0.data(), z0.data(), y0.data(), 1);
      for (int threads : {3}) {  // the generic reference above ran on 1 thread
        s1.assign(L.nscales(), 0.f), z1.assign(L.nscales(), 0.f);
        const bool ok = quantize_dynamic(k, x.data(), L, mode != 1, p, s1.data(), z1.data(),
                                         q1.data(), threads, &bad);
        dequantize(k, q1.data(), mode != 1, L, s1.data(), z1.data(), y1.data(), threads);
        const std::string tag = std::string(k.name) + " driver " + std::to_string(gi) + "/" +
                                std::to_string(mode) + " t" + std::to_string(threads);
        check(ok, tag + " ok");
        check(std::memcmp(s0.data(), s1.data(), 4 * s0.size()) == 0, tag + " scales");
        check(std::memcmp(z0.data(), z1.data(), 4 * z0.size()) == 0, tag + " zps");
        check(q0 == q1, tag + " q");
        check(std::memcmp(y0.data(), y1.data(), 4 * n) == 0, tag + " y");
      }
      d.add(q1.data(), n), d.add(s1.data(), 4 * s1.size()), d.add(y1.data(), 4 * n);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: %s quant_vectors.txt\n", argv[0]);
    return 2;
  }
  const std::vector<Case> cases = load_vectors(argv[1]);
  check(cases.size() == 13, "vector file has 13 cases");
  std::string digest;
  for (Isa isa : {Isa::Generic, Isa::Sse2, Isa::Avx2, Isa::Avx512, Isa::Neon}) {
    if (!isa_available(isa)) continue;
    const Kernels& k = select_kernels(isa);
    Fnv d;
    const int before = failures;
    test_vectors(k, cases, d);
    test_against_reference(k, d);
    test_drivers(k, d);
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(d.h));
    std::printf("isa %s: %s\n", k.name, failures == before ? "ok" : "FAILED");
    if (digest.empty()) digest = hex;
    check(digest == hex, std::string(k.name) + " digest equals generic digest");
  }
  std::printf("best %s\n", best_isa_name());
  std::printf("digest %s\n", digest.c_str());
  std::printf("%ld checks, %d failures\n%s\n", checks, failures, failures ? "FAILED" : "ALL OK");
  return failures ? 1 : 0;
}
