// Sparse update kernels: top-k by magnitude, error feedback, index coding, int4 packing.
//
// Every function here trusts its arguments (lengths, index order, bounds): the Python
// binding (bind_sparse.cpp) validates them before calling. Functions that must look at
// the data anyway (top-k, index decoding) also reject non-finite input / malformed
// streams themselves, by throwing edgefed::InvalidArgument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"

namespace edgefed {

// effective_threads() asks the OS for the CPU count on every call (a sysfs read, ~10-30
// us), which dominated small kernel calls (scales, biases). Inputs too small to split
// never need that answer: return 1 for them first (same result as effective_threads).
inline int pick_threads(std::size_t n, int requested, std::size_t min_per_thread = 1 << 16) {
  if (requested == 1 || n < 2 * min_per_thread) return 1;
  return effective_threads(n, requested, min_per_thread);
}

// ---------------------------------------------------------------------------------
// Top-k by magnitude.
//
// Result: indices strictly increasing (so they can be delta-coded directly) with their
// values. Ties at the threshold magnitude are broken by taking the lowest indices,
// which makes the result deterministic and independent of the thread count.
// Magnitudes are compared on the IEEE bit pattern of |x| (bits & 0x7fffffff), which is
// monotonic for finite floats; -0.0 and +0.0 are equal. NaN / Inf are rejected.
// ---------------------------------------------------------------------------------
// resize() without zero-filling: a top-k result is written in full right after it is
// sized, and zeroing it first touched every fresh page twice (0.3 ms for k = 100K).
template <class T>
struct UninitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;  // default-init: no zeroing for arithmetic types
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};

using IndexVec = std::vector<uint32_t, UninitAllocator<uint32_t>>;
using ValueVec = std::vector<float, UninitAllocator<float>>;

struct TopK {
  IndexVec indices;
  ValueVec values;
};

// Exact: returns exactly min(k, n) entries, the largest magnitudes.
// Algorithm: (1) a sample of 65536 magnitudes (4096 cache-line runs at random offsets
// in equal strides) gives two bounds L < (k-th magnitude) < H, 5 binomial standard
// deviations either side; (2) one threaded pass over x keeps |x| >= H ("definite") and
// L <= |x| < H ("band"), with their values, in index order, per thread part (read in
// place: no concatenated copies); (3) exact selection inside the band only (a 2048-bin
// histogram over [L, H) per part, then nth_element among the threshold bin's members),
// then each part merges its two index-ordered lists into its own output slice, in
// parallel. If the
// sample was unlucky (more than k definite, fewer than k in total, or a buffer cap hit)
// it falls back to a two-level radix histogram of the 31-bit magnitude (16 + 15 bits,
// three passes), which is exact for any input. NaN / Inf -> InvalidArgument.
TopK topk_exact(const float* x, std::size_t n, std::size_t k, int threads);

// Approximate: threshold from a sample, then one pass. The returned set is always the
// exact top-m by magnitude for its own count m, and m satisfies
//     |m - k| <= ceil(tolerance * k)          (guaranteed, not just likely)
// because a pass whose count falls outside that band is redone exactly (fallback).
// Sample size s = 1000 n / k (clamped to [4096, n / 16]): about 1000 sampled hits, so a
// 10% band is ~3.2 binomial standard deviations and a fallback happens in roughly 0.15%
// of calls for well-behaved data; when n / 16 caps s (k/n < 1.6%), fallbacks grow
// more frequent but the band is still guaranteed.
TopK topk_approx(const float* x, std::size_t n, std::size_t k, double tolerance,
                 uint64_t seed, int threads);

// Exact top-k threshold machinery, exposed for tests: the radix path alone.
TopK topk_radix(const float* x, std::size_t n, std::size_t k, int threads);

// ---------------------------------------------------------------------------------
// Error feedback, fused with top-k + int8 (Deep Gradient Compression style).
//   residual += update                       (in place, finiteness checked)
//   (idx, v)  = topk(residual)               (exact or approximate)
//   q         = round_half_even(v / s), s = max|v| / 127, saturated to [-127, 127]
//   residual[idx] -= q * s                   (so residual = acc - decode(encode(acc)))
// With quantize=false the values are sent as float32 and residual[idx] becomes 0.
// ---------------------------------------------------------------------------------
struct EfTopK {
  IndexVec indices;
  ValueVec values;  // float values (quantize=false) or empty
  std::vector<int8_t> q;      // int8 codes (quantize=true) or empty
  float scale = 0.0f;
};
EfTopK ef_topk(float* residual, const float* update, std::size_t n, std::size_t k,
               bool quantize, bool approximate, double tolerance, uint64_t seed, int threads);

// residual += update; throws on a non-finite result.
void add_inplace_checked(float* residual, const float* update, std::size_t n, int threads);

// Symmetric int8 of a small vector with one scale (max|v| / 127; 0 when all zero).
float quantize_int8_one_scale(const float* v, std::size_t n, int8_t* q);

// ---------------------------------------------------------------------------------
// Index coding for strictly increasing indices in [0, n).
//   varint: first index, then gaps (idx[i] - idx[i-1], >= 1), LEB128 unsigned.
//   bitmap: ceil(n / 8) bytes, bit (i % 8) of byte i / 8 set for each index (LSB first).
// choose_index_coding picks whichever is smaller (ties -> varint).
// ---------------------------------------------------------------------------------
enum class IndexCoding : uint8_t { kVarint = 0, kBitmap = 1 };
std::size_t varint_size(const uint32_t* idx, std::size_t count);
std::vector<uint8_t> encode_varint(const uint32_t* idx, std::size_t count);
std::vector<uint8_t> encode_bitmap(const uint32_t* idx, std::size_t count, std::size_t n);
IndexCoding choose_index_coding(const uint32_t* idx, std::size_t count, std::size_t n);
// Decoders validate everything: exact `count` entries, strictly increasing, < n,
// no overlong / overflowing varint, no trailing bytes, bitmap padding bits zero.
// `out` must hold `count` entries (the caller allocates from a validated count).
void decode_varint(const uint8_t* data, std::size_t size, std::size_t count, std::size_t n,
                   uint32_t* out);
void decode_bitmap(const uint8_t* data, std::size_t size, std::size_t count, std::size_t n,
                   uint32_t* out);

// ---------------------------------------------------------------------------------
// int4 block-wise (ONNX int4 semantics): two values per byte, element 2i in the low
// nibble, 2i+1 in the high nibble; codes saturate to [-8, 7]; odd length -> high nibble
// of the last byte is 0. Scale per block = max|x| / 7 (symmetric, zero point 0).
// q = saturate(round_half_even(x / scale)).
// ---------------------------------------------------------------------------------
void pack_int4(const int8_t* q, std::size_t n, uint8_t* packed);  // q saturated first
void unpack_int4(const uint8_t* packed, std::size_t n, int8_t* q);
void quantize_int4_blocks(const float* x, std::size_t n, std::size_t block, uint8_t* packed,
                          float* scales, int threads);
void dequantize_int4_blocks(const uint8_t* packed, std::size_t n, std::size_t block,
                            const float* scales, float* out, int threads);

// Dense int8 block-wise (scale per block = max|x| / 127, symmetric). Used by the codec
// when edgefed.quant is not available, and by the int4/int8 error-feedback paths.
void quantize_int8_blocks(const float* x, std::size_t n, std::size_t block, int8_t* q,
                          float* scales, int threads);

// True if every value is finite.
bool all_finite(const float* x, std::size_t n, int threads);

}  // namespace edgefed
