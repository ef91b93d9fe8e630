// Weighted accumulation from compressed forms (portable C++, auto-vectorised loops).
#include <algorithm>
#include <cstring>

#include "aggregate.h"
#include "common.h"
#include "sparse.h"

namespace edgefed {

float half_to_float(uint16_t h) {
  // Branch-light conversion: normals/Inf/NaN by re-biasing the exponent, subnormals by
  // a float multiply (exact: 2^-24 scaling of an integer < 1024).
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

void acc_dense_f32(float* sums, const float* x, std::size_t n, float w, int threads) {
  parallel_for(n, pick_threads(n, threads), 1024, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t i = b; i < e; ++i) sums[i] += w * x[i];
  });
}

void acc_dense_f16(float* sums, const uint16_t* h, std::size_t n, float w, int threads) {
  parallel_for(n, pick_threads(n, threads), 1024, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t i = b; i < e; ++i) sums[i] += w * half_to_float(h[i]);
  });
}

void acc_dense_int8(float* sums, const int8_t* q, std::size_t n, const float* scales,
                    std::size_t block, float w, int threads) {
  const std::size_t nb = (n + block - 1) / block;
  parallel_for(nb, pick_threads(n, threads) > 1 ? pick_threads(nb, threads, 1) : 1, 1,
               [&](std::size_t b0, std::size_t b1, int) {
                 for (std::size_t bl = b0; bl < b1; ++bl) {
                   const float s = w * scales[bl];
                   std::size_t b = bl * block, e = b + block < n ? b + block : n;
                   for (std::size_t i = b; i < e; ++i) sums[i] += s * static_cast<float>(q[i]);
                 }
               });
}

void acc_dense_int4(float* sums, const uint8_t* packed, std::size_t n, const float* scales,
                    std::size_t block, float w, int threads) {
  parallel_for(n, pick_threads(n, threads), 2, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t i = b; i < e; ++i) {
      uint8_t nib = (packed[i / 2] >> ((i & 1) * 4)) & 0x0f;
      int8_t v = static_cast<int8_t>(static_cast<int8_t>(nib << 4) >> 4);
      sums[i] += w * scales[i / block] * static_cast<float>(v);
    }
  });
}

namespace {
template <class Value>
void acc_sparse(float* sums, float* wsums, const uint32_t* idx, std::size_t count, float vw,
                float w, int threads, Value&& value) {
  parallel_for(count, pick_threads(count, threads, 1 << 15), 1,
               [&](std::size_t b, std::size_t e, int) {
                 for (std::size_t j = b; j < e; ++j) sums[idx[j]] += vw * value(j);
                 if (wsums)
                   for (std::size_t j = b; j < e; ++j) wsums[idx[j]] += w;
               });
}
}  // namespace

void acc_sparse_f32(float* sums, float* wsums, const uint32_t* idx, const float* v,
                    std::size_t count, float w, int threads) {
  acc_sparse(sums, wsums, idx, count, w, w, threads, [&](std::size_t j) { return v[j]; });
}

void acc_sparse_f16(float* sums, float* wsums, const uint32_t* idx, const uint16_t* h,
                    std::size_t count, float w, int threads) {
  acc_sparse(sums, wsums, idx, count, w, w, threads,
             [&](std::size_t j) { return half_to_float(h[j]); });
}

void acc_sparse_int8(float* sums, float* wsums, const uint32_t* idx, const int8_t* q,
                     std::size_t count, float scale, float w, int threads) {
  acc_sparse(sums, wsums, idx, count, w * scale, w, threads,
             [&](std::size_t j) { return static_cast<float>(q[j]); });
}

void acc_sparse_batch(float* sums, float* wsums, std::size_t n, const SparseRef* refs,
                      std::size_t nrefs, std::size_t chunk, int threads) {
  if (n == 0 || nrefs == 0) return;
  chunk = std::max<std::size_t>(chunk, 1024);
  const std::size_t nchunks = (n + chunk - 1) / chunk;
  std::size_t total = 0;
  for (std::size_t r = 0; r < nrefs; ++r) total += refs[r].count;
  const int t = total < (1u << 15) ? 1 : std::min<int>(pick_threads(total, threads, 1 << 14),
                                                        static_cast<int>(nchunks));
  parallel_for(nchunks, t, 1, [&](std::size_t c0, std::size_t c1, int) {
    // Per update, a cursor to its first entry at or after this thread's first chunk.
    std::vector<std::size_t> pos(nrefs);
    const uint32_t lo = static_cast<uint32_t>(c0 * chunk);
    for (std::size_t r = 0; r < nrefs; ++r)
      pos[r] = static_cast<std::size_t>(
          std::lower_bound(refs[r].idx, refs[r].idx + refs[r].count, lo) - refs[r].idx);
    // The scatter inside a chunk is cache-friendly only once the chunk is in cache:
    // prefetch the next chunk's lines while this one is processed (sequential, so the
    // memory system streams it instead of paying one DRAM latency per random entry).
    auto prefetch_chunk = [&](std::size_t c) {
      if (c >= c1) return;
      const std::size_t b = c * chunk, e = std::min(n, b + chunk);
      for (std::size_t i = b; i < e; i += 16) {
        __builtin_prefetch(sums + i, 1, 3);
        if (wsums) __builtin_prefetch(wsums + i, 1, 3);
      }
    };
    prefetch_chunk(c0);
    for (std::size_t c = c0; c < c1; ++c) {
      prefetch_chunk(c + 1);
      const std::size_t end = std::min(n, (c + 1) * chunk);
      for (std::size_t r = 0; r < nrefs; ++r) {
        const SparseRef& R = refs[r];
        std::size_t j = pos[r];
        const std::size_t j0 = j;
        const float vw = R.value_weight;
        switch (R.type) {
          case ValueType::kF32: {
            const float* v = static_cast<const float*>(R.values);
            for (; j < R.count && R.idx[j] < end; ++j) sums[R.idx[j]] += vw * v[j];
            break;
          }
          case ValueType::kF16: {
            const uint16_t* v = static_cast<const uint16_t*>(R.values);
            for (; j < R.count && R.idx[j] < end; ++j) sums[R.idx[j]] += vw * half_to_float(v[j]);
            break;
          }
          case ValueType::kI8: {
            const int8_t* v = static_cast<const int8_t*>(R.values);
            for (; j < R.count && R.idx[j] < end; ++j)
              sums[R.idx[j]] += vw * static_cast<float>(v[j]);
            break;
          }
        }
        if (R.absent && wsums)
          for (std::size_t q = j0; q < j; ++q) wsums[R.idx[q]] += R.weight;
        pos[r] = j;
      }
    }
  });
}

}  // namespace edgefed
