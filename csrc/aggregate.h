// Aggregation without expansion: add one compressed update, times a weight, straight
// into a float32 accumulator. No dense copy of the update is ever made.
//
// Weight bookkeeping: a dense tensor (or a top-k tensor, whose missing coordinates are
// zeros) contributes its weight to every coordinate; the caller tracks that as one scalar
// per tensor. A sparse tensor whose missing coordinates are ABSENT (a partial update)
// adds its weight only at its indices, into `wsums` (pass nullptr otherwise).
// Arguments are trusted: bind_sparse.cpp validates lengths, index order and bounds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefed {

// sums[i] += w * x[i]
void acc_dense_f32(float* sums, const float* x, std::size_t n, float w, int threads);
// sums[i] += w * half_to_float(h[i])   (IEEE binary16 bit patterns)
void acc_dense_f16(float* sums, const uint16_t* h, std::size_t n, float w, int threads);
// sums[i] += w * scales[i / block] * q[i]
void acc_dense_int8(float* sums, const int8_t* q, std::size_t n, const float* scales,
                    std::size_t block, float w, int threads);
// sums[i] += w * scales[i / block] * int4(packed, i)
void acc_dense_int4(float* sums, const uint8_t* packed, std::size_t n, const float* scales,
                    std::size_t block, float w, int threads);
// sums[idx[j]] += w * v[j]; wsums[idx[j]] += w when wsums != nullptr.
// Indices strictly increasing, so threads split the entries without conflicts.
void acc_sparse_f32(float* sums, float* wsums, const uint32_t* idx, const float* v,
                    std::size_t count, float w, int threads);
void acc_sparse_f16(float* sums, float* wsums, const uint32_t* idx, const uint16_t* h,
                    std::size_t count, float w, int threads);
void acc_sparse_int8(float* sums, float* wsums, const uint32_t* idx, const int8_t* q,
                     std::size_t count, float scale, float w, int threads);

// Many sparse updates of one tensor at once, cache-blocked: the coordinate range is cut
// into chunks of `chunk` floats (L2-sized); each thread owns whole chunks and, per chunk,
// walks every update's (sorted) entries that fall inside it. The random scatter then
// hits cache instead of DRAM, and no two threads ever touch the same coordinate.
enum class ValueType : uint8_t { kF32 = 0, kF16 = 1, kI8 = 2 };
struct SparseRef {
  const uint32_t* idx;
  const void* values;
  std::size_t count;
  ValueType type;
  float value_weight;  // weight * scale (int8) or weight
  float weight;        // added to wsums when `absent`
  bool absent;         // missing coordinates are absent (per-coordinate weights)
};
void acc_sparse_batch(float* sums, float* wsums, std::size_t n, const SparseRef* refs,
                      std::size_t nrefs, std::size_t chunk, int threads);

// Exact IEEE binary16 -> binary32 (subnormals, Inf, NaN preserved).
float half_to_float(uint16_t h);

}  // namespace edgefed
