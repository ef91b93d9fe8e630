// int8 / uint8 quantization with ONNX QuantizeLinear / DequantizeLinear semantics.
//
//   quantize:   q = Saturate(RoundHalfToEven(x / scale) + zero_point)     (a true division)
//   dequantize: y = (float(q) - zero_point) * scale
//
// Kernels assume the default floating-point environment (round-to-nearest-even, as MLAS
// does). Saturation is done MLAS-style before rounding: v is clamped to the integer bounds
// [qmin - zp, qmax - zp]; because the bounds are integers this equals saturating after
// rounding, and it maps +Inf -> qmax, -Inf and NaN -> qmin (onnxruntime's result on x86).
//
// Layout: every granularity is described on the view [outer, len, inner] of a C-contiguous
// tensor around `axis`; scales (and zero points) have shape
//   per tensor: 1, per axis: len, blocked: [outer, ceil(len / block), inner] (ONNX opset 21).
// Stochastic rounding adds u ~ U[0,1) from a counter-based hash of (seed, flat index), so
// results do not depend on thread count or ISA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace edgefed::quant {

// Raised for NaN / Inf in an input tensor (bound to its own Python ValueError subclass).
struct NonFiniteInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// ---- per-ISA kernels (one table per instruction set; all of them bit-identical) ----
struct Kernels {
  const char* name;
  // min / max over x[0, n) (n >= 1); returns true if x holds NaN or Inf.
  bool (*minmax)(const float* x, std::size_t n, float* mn, float* mx);
  // element-wise running min / max: mn[i] = min(mn[i], x[i]); returns true on NaN / Inf.
  bool (*minmax_cols)(const float* x, std::size_t n, float* mn, float* mx);
  // quantize x[0, n) with one scale / zero point; writes the low byte of the result.
  bool (*quant)(const float* x, std::size_t n, float scale, float zp, float qmin, float qmax,
                std::uint8_t* out);
  // quantize with per-element scale[i] / zp[i].
  bool (*quant_vec)(const float* x, std::size_t n, const float* scale, const float* zp,
                    float qmin, float qmax, std::uint8_t* out);
  // dequantize; is_signed selects int8 vs uint8 input bytes.
  void (*dequant)(const std::uint8_t* q, std::size_t n, bool is_signed, float scale, float zp,
                  float* out);
  void (*dequant_vec)(const std::uint8_t* q, std::size_t n, bool is_signed, const float* scale,
                      const float* zp, float* out);
  // stochastic rounding of x[0, n) whose flat indices start at base; scale / zp are one
  // value (vec = false) or per element; k0 / k1 are the RNG keys derived from the seed.
  bool (*stoch)(const float* x, std::size_t n, std::uint32_t base, const float* scale,
                const float* zp, bool vec, float qmin, float qmax, std::uint32_t k0,
                std::uint32_t k1, std::uint8_t* out);
};

enum class Isa { Auto, Generic, Sse2, Avx2, Avx512, Neon };

const Kernels& kernels_generic();
#if defined(EDGEFED_X86)
const Kernels& kernels_sse2();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif
#if defined(EDGEFED_ARM64)
const Kernels& kernels_neon();
#endif

Isa parse_isa(const std::string& name);          // throws InvalidArgument on unknown names
bool isa_available(Isa isa);
const Kernels& select_kernels(Isa isa);          // throws InvalidArgument if not available
const char* best_isa_name();

// ---- layout ----
enum class Granularity { PerTensor, PerAxis, Blocked };

struct Layout {
  Granularity gran = Granularity::PerTensor;
  std::size_t outer = 1, len = 1, inner = 1;  // numel = outer * len * inner
  std::size_t block = 0;                      // Blocked only
  std::size_t numel() const { return outer * len * inner; }
  std::size_t nblocks() const { return block ? (len + block - 1) / block : 0; }
  std::size_t nscales() const;
};

// Largest tensor accepted (elements): indices and the RNG counter are 32-bit.
constexpr std::size_t kMaxElements = std::size_t{1} << 31;
void check_size(std::size_t numel);  // throws InvalidArgument above kMaxElements

struct QuantParams {
  float qmin = -128.f, qmax = 127.f;
  bool stochastic = false;
  std::uint64_t seed = 0;
};

// Scale / zero point of one range, the ONNX way (DynamicQuantizeLinear for asymmetric:
// range extended to include 0, zp = RoundHalfToEven(clamp(qmin - min / scale))); symmetric:
// scale = absmax / qmax, zp = 0. A zero range (or one that underflows) gives scale 1.
void params_from_range(float mn, float mx, bool symmetric, float qmin, float qmax, float* scale,
                       float* zp);

// Counter-based uniform in [0, 1) with 24 random bits: hash of (seed, index).
float stochastic_uniform(std::uint64_t seed, std::uint32_t index);
// The two 32-bit keys the kernels' hash uses for a 64-bit seed (splitmix64 of the seed).
void stochastic_keys(std::uint64_t seed, std::uint32_t* k0, std::uint32_t* k1);

// ---- drivers (threads: 0 = all cores). All return normally or throw. ----
// Quantize with given scales / zero points. Returns false (first bad flat index in
// *bad_index) on NaN / Inf unless allow_nonfinite; the output is then partly written.
bool quantize(const Kernels& k, const float* x, const Layout& lay, const float* scale,
              const float* zp, const QuantParams& p, std::uint8_t* out, int threads,
              bool allow_nonfinite, std::int64_t* bad_index);
// Compute scales / zero points (nscales() each). Returns false (and *bad_index) on NaN / Inf.
bool compute_scales(const Kernels& k, const float* x, const Layout& lay, bool symmetric,
                    float qmin, float qmax, float* scale, float* zp, int threads,
                    std::int64_t* bad_index);
// Compute scales and quantize; blocked layouts do it in one pass (block stays in cache).
bool quantize_dynamic(const Kernels& k, const float* x, const Layout& lay, bool symmetric,
                      const QuantParams& p, float* scale, float* zp, std::uint8_t* out,
                      int threads, std::int64_t* bad_index);
void dequantize(const Kernels& k, const std::uint8_t* q, bool is_signed, const Layout& lay,
                const float* scale, const float* zp, float* out, int threads);

std::int64_t first_nonfinite(const float* x, std::size_t n);  // -1 if none

}  // namespace edgefed::quant
