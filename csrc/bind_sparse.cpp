// Bindings for top-k, error feedback, index coding, int4 packing and aggregation.
//
// Every argument is validated here, before a kernel touches memory: dtype, C-contiguity,
// writeability of outputs, lengths that must agree, indices strictly increasing and in
// range, finite weights and scales. Kernels then run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <string>

#include "aggregate.h"
#include "common.h"
#include "sparse.h"

namespace py = pybind11;
using edgefed::require;

namespace {

template <class T>
const T* in_ptr(const py::array& a, const char* name) {
  // Messages are built only on failure: this runs on every call.
  if (!a.dtype().is(py::dtype::of<T>()))
    throw edgefed::InvalidArgument(std::string(name) + ": expected dtype " +
                                   std::string(py::str(py::dtype::of<T>())) + ", got " +
                                   std::string(py::str(a.dtype())));
  if ((a.flags() & py::array::c_style) == 0)
    throw edgefed::InvalidArgument(std::string(name) + ": must be C-contiguous");
  return static_cast<const T*>(a.data());
}

template <class T>
T* out_ptr(py::array& a, const char* name) {
  in_ptr<T>(a, name);
  if (!a.writeable()) throw edgefed::InvalidArgument(std::string(name) + ": must be writeable");
  return static_cast<T*>(a.mutable_data());
}

template <class V>
py::array_t<typename V::value_type> vec_to_array(V&& v) {
  using T = typename V::value_type;
  using Vec = std::decay_t<V>;
  auto* heap = new Vec(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<Vec*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {sizeof(T)}, heap->data(),
                        owner);
}

void check_weight(double w) {
  require(std::isfinite(w), "weight must be finite");
}

void check_n(std::size_t n) {
  require(n < (std::size_t{1} << 32), "tensor too large: at most 2^32 - 1 elements supported");
}

// Strictly increasing and < n (validated before any scatter).
void check_indices(const uint32_t* idx, std::size_t count, std::size_t n) {
  // Messages are built only on failure (this loop runs over every index).
  for (std::size_t i = 0; i < count; ++i) {
    if (idx[i] >= n)
      throw edgefed::InvalidArgument("index " + std::to_string(idx[i]) +
                                     " out of range for size " + std::to_string(n));
    if (i > 0 && idx[i] <= idx[i - 1])
      throw edgefed::InvalidArgument(
          "indices not strictly increasing (unsorted or duplicate) at position " +
          std::to_string(i));
  }
}

void check_scales(const float* s, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i)
    if (!(std::isfinite(s[i]) && s[i] >= 0.0f))
      throw edgefed::InvalidArgument("scales must be finite and >= 0");
}

std::size_t check_block(std::size_t n, std::size_t block, std::size_t scales_len) {
  require(block >= 1, "block must be >= 1");
  std::size_t nb = n == 0 ? 0 : (n + block - 1) / block;
  require(scales_len == nb, "scales has " + std::to_string(scales_len) + " entries, expected " +
                                std::to_string(nb));
  return nb;
}

}  // namespace

void register_sparse(py::module_& m) {
  m.def(
      "topk",
      [](py::array x, std::size_t k, bool approximate, double tolerance, uint64_t seed,
         int threads) {
        const float* p = in_ptr<float>(x, "x");
        std::size_t n = x.size();
        check_n(n);
        require(tolerance >= 0.0 && tolerance <= 1.0, "tolerance must be in [0, 1]");
        edgefed::TopK r;
        {
          py::gil_scoped_release nogil;
          r = approximate ? edgefed::topk_approx(p, n, k, tolerance, seed, threads)
                          : edgefed::topk_exact(p, n, k, threads);
        }
        return py::make_tuple(vec_to_array(std::move(r.indices)), vec_to_array(std::move(r.values)));
      },
      py::arg("x"), py::arg("k"), py::arg("approximate") = false, py::arg("tolerance") = 0.1,
      py::arg("seed") = 0, py::arg("threads") = 0,
      "Top-k by magnitude -> (uint32 indices ascending, float32 values).");

  m.def(
      "topk_radix",
      [](py::array x, std::size_t k, int threads) {
        const float* p = in_ptr<float>(x, "x");
        std::size_t n = x.size();
        check_n(n);
        edgefed::TopK r;
        {
          py::gil_scoped_release nogil;
          r = edgefed::topk_radix(p, n, k, threads);
        }
        return py::make_tuple(vec_to_array(std::move(r.indices)), vec_to_array(std::move(r.values)));
      },
      py::arg("x"), py::arg("k"), py::arg("threads") = 0,
      "Exact top-k via the radix-histogram path only (for tests).");

  m.def(
      "ef_topk",
      [](py::array residual, py::array update, std::size_t k, bool quantize, bool approximate,
         double tolerance, uint64_t seed, int threads) {
        float* r = out_ptr<float>(residual, "residual");
        const float* u = in_ptr<float>(update, "update");
        std::size_t n = residual.size();
        check_n(n);
        require(update.size() == static_cast<py::ssize_t>(n),
                "residual and update lengths disagree");
        require(tolerance >= 0.0 && tolerance <= 1.0, "tolerance must be in [0, 1]");
        edgefed::EfTopK out;
        {
          py::gil_scoped_release nogil;
          out = edgefed::ef_topk(r, u, n, k, quantize, approximate, tolerance, seed, threads);
        }
        py::object vals = quantize ? py::object(vec_to_array(std::move(out.q)))
                                   : py::object(vec_to_array(std::move(out.values)));
        return py::make_tuple(vec_to_array(std::move(out.indices)), vals, out.scale);
      },
      py::arg("residual"), py::arg("update"), py::arg("k"), py::arg("quantize") = true,
      py::arg("approximate") = false, py::arg("tolerance") = 0.1, py::arg("seed") = 0,
      py::arg("threads") = 0,
      "Error feedback + top-k (+ int8) in place -> (indices, int8 codes | float values, scale).");

  m.def(
      "add_inplace",
      [](py::array residual, py::array update, int threads) {
        float* r = out_ptr<float>(residual, "residual");
        const float* u = in_ptr<float>(update, "update");
        require(update.size() == residual.size(), "residual and update lengths disagree");
        std::size_t n = residual.size();
        py::gil_scoped_release nogil;
        edgefed::add_inplace_checked(r, u, n, threads);
      },
      py::arg("residual"), py::arg("update"), py::arg("threads") = 0);

  m.def(
      "all_finite",
      [](py::array x, int threads) {
        const float* p = in_ptr<float>(x, "x");
        std::size_t n = x.size();
        py::gil_scoped_release nogil;
        return edgefed::all_finite(p, n, threads);
      },
      py::arg("x"), py::arg("threads") = 0);

  m.def(
      "quantize_int8_one_scale",
      [](py::array v) {
        const float* p = in_ptr<float>(v, "values");
        std::vector<int8_t> q(v.size());
        float s = edgefed::quantize_int8_one_scale(p, q.size(), q.data());
        return py::make_tuple(vec_to_array(std::move(q)), s);
      },
      py::arg("values"));

  // ---- index coding ----
  m.def(
      "check_indices",
      [](py::array idx, std::size_t n) {
        const uint32_t* p = in_ptr<uint32_t>(idx, "indices");
        check_indices(p, idx.size(), n);
      },
      py::arg("indices"), py::arg("n"), "Raise unless strictly increasing and < n.");

  m.def(
      "encode_indices",
      [](py::array idx, std::size_t n, const std::string& coding) {
        const uint32_t* p = in_ptr<uint32_t>(idx, "indices");
        std::size_t c = idx.size();
        check_n(n);
        check_indices(p, c, n);
        edgefed::IndexCoding ic;
        if (coding == "auto")
          ic = edgefed::choose_index_coding(p, c, n);
        else if (coding == "varint")
          ic = edgefed::IndexCoding::kVarint;
        else if (coding == "bitmap")
          ic = edgefed::IndexCoding::kBitmap;
        else
          throw edgefed::InvalidArgument("coding must be 'auto', 'varint' or 'bitmap'");
        std::vector<uint8_t> bytes = ic == edgefed::IndexCoding::kVarint
                                         ? edgefed::encode_varint(p, c)
                                         : edgefed::encode_bitmap(p, c, n);
        return py::make_tuple(std::string(ic == edgefed::IndexCoding::kVarint ? "varint" : "bitmap"),
                              vec_to_array(std::move(bytes)));
      },
      py::arg("indices"), py::arg("n"), py::arg("coding") = "auto",
      "Encode strictly increasing indices -> (coding name, uint8 array).");

  m.def(
      "decode_indices",
      [](py::array data, const std::string& coding, std::size_t count, std::size_t n) {
        const uint8_t* p = in_ptr<uint8_t>(data, "data");
        std::size_t size = data.size();
        check_n(n);
        // The count is attacker-chosen: bound it by what the bytes / tensor can hold
        // before allocating the output.
        require(count <= n, "index count exceeds tensor size");
        if (coding == "varint") {
          require(count <= size, "index count exceeds index stream length");
        } else if (coding != "bitmap") {
          throw edgefed::InvalidArgument("unknown index coding '" + coding + "'");
        }
        std::vector<uint32_t> out(count);
        {
          py::gil_scoped_release nogil;
          if (coding == "varint")
            edgefed::decode_varint(p, size, count, n, out.data());
          else
            edgefed::decode_bitmap(p, size, count, n, out.data());
        }
        return vec_to_array(std::move(out));
      },
      py::arg("data"), py::arg("coding"), py::arg("count"), py::arg("n"));

  // ---- int4 / int8 blocks ----
  m.def(
      "pack_int4",
      [](py::array q) {
        const int8_t* p = in_ptr<int8_t>(q, "q");
        std::vector<uint8_t> out((q.size() + 1) / 2);
        edgefed::pack_int4(p, q.size(), out.data());
        return vec_to_array(std::move(out));
      },
      py::arg("q"), "Pack int8 codes (saturated to [-8, 7]) two per byte, low nibble first.");

  m.def(
      "unpack_int4",
      [](py::array packed, std::size_t n) {
        const uint8_t* p = in_ptr<uint8_t>(packed, "packed");
        require(static_cast<std::size_t>(packed.size()) == (n + 1) / 2,
                "packed length does not match n");
        std::vector<int8_t> out(n);
        edgefed::unpack_int4(p, n, out.data());
        return vec_to_array(std::move(out));
      },
      py::arg("packed"), py::arg("n"));

  m.def(
      "quantize_int4_blocks",
      [](py::array x, std::size_t block, int threads) {
        const float* p = in_ptr<float>(x, "x");
        std::size_t n = x.size();
        require(block >= 1, "block must be >= 1");
        std::vector<uint8_t> packed((n + 1) / 2);
        std::vector<float> scales(n == 0 ? 0 : (n + block - 1) / block);
        {
          py::gil_scoped_release nogil;
          edgefed::quantize_int4_blocks(p, n, block, packed.data(), scales.data(), threads);
        }
        return py::make_tuple(vec_to_array(std::move(packed)), vec_to_array(std::move(scales)));
      },
      py::arg("x"), py::arg("block"), py::arg("threads") = 0);

  m.def(
      "dequantize_int4_blocks",
      [](py::array packed, std::size_t n, std::size_t block, py::array scales, int threads) {
        const uint8_t* p = in_ptr<uint8_t>(packed, "packed");
        const float* s = in_ptr<float>(scales, "scales");
        require(static_cast<std::size_t>(packed.size()) == (n + 1) / 2,
                "packed length does not match n");
        check_block(n, block, scales.size());
        check_scales(s, scales.size());
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          edgefed::dequantize_int4_blocks(p, n, block, s, o, threads);
        }
        return out;
      },
      py::arg("packed"), py::arg("n"), py::arg("block"), py::arg("scales"), py::arg("threads") = 0);

  m.def(
      "quantize_int8_blocks",
      [](py::array x, std::size_t block, int threads) {
        const float* p = in_ptr<float>(x, "x");
        std::size_t n = x.size();
        require(block >= 1, "block must be >= 1");
        std::vector<int8_t> q(n);
        std::vector<float> scales(n == 0 ? 0 : (n + block - 1) / block);
        {
          py::gil_scoped_release nogil;
          edgefed::quantize_int8_blocks(p, n, block, q.data(), scales.data(), threads);
        }
        return py::make_tuple(vec_to_array(std::move(q)), vec_to_array(std::move(scales)));
      },
      py::arg("x"), py::arg("block"), py::arg("threads") = 0,
      "Symmetric int8 per block (scale = max|x| / 127, round half to even).");

  // ---- aggregation ----
  m.def(
      "acc_dense",
      [](py::array sums, py::array x, double w, int threads) {
        float* s = out_ptr<float>(sums, "sums");
        check_weight(w);
        require(x.size() == sums.size(), "update length does not match accumulator");
        std::size_t n = sums.size();
        if (x.dtype().is(py::dtype::of<float>())) {
          const float* p = in_ptr<float>(x, "x");
          require(edgefed::all_finite(p, n, threads), "update contains NaN or Inf");
          py::gil_scoped_release nogil;
          edgefed::acc_dense_f32(s, p, n, static_cast<float>(w), threads);
        } else if (x.dtype().is(py::dtype("float16"))) {
          require((x.flags() & py::array::c_style) != 0, "x: must be C-contiguous");
          const uint16_t* p = static_cast<const uint16_t*>(x.data());
          for (std::size_t i = 0; i < n; ++i)
            if ((p[i] & 0x7c00u) == 0x7c00u)
              throw edgefed::InvalidArgument("update contains NaN or Inf");
          py::gil_scoped_release nogil;
          edgefed::acc_dense_f16(s, p, n, static_cast<float>(w), threads);
        } else {
          throw edgefed::InvalidArgument("x: expected float32 or float16");
        }
      },
      py::arg("sums"), py::arg("x"), py::arg("weight"), py::arg("threads") = 0,
      "sums += weight * x for float32 or float16 x.");

  m.def(
      "acc_dense_int8",
      [](py::array sums, py::array q, py::array scales, std::size_t block, double w, int threads) {
        float* s = out_ptr<float>(sums, "sums");
        const int8_t* p = in_ptr<int8_t>(q, "q");
        const float* sc = in_ptr<float>(scales, "scales");
        check_weight(w);
        require(q.size() == sums.size(), "update length does not match accumulator");
        std::size_t n = sums.size();
        check_block(n, block, scales.size());
        check_scales(sc, scales.size());
        py::gil_scoped_release nogil;
        edgefed::acc_dense_int8(s, p, n, sc, block, static_cast<float>(w), threads);
      },
      py::arg("sums"), py::arg("q"), py::arg("scales"), py::arg("block"), py::arg("weight"),
      py::arg("threads") = 0);

  m.def(
      "acc_dense_int4",
      [](py::array sums, py::array packed, py::array scales, std::size_t block, double w,
         int threads) {
        float* s = out_ptr<float>(sums, "sums");
        const uint8_t* p = in_ptr<uint8_t>(packed, "packed");
        const float* sc = in_ptr<float>(scales, "scales");
        check_weight(w);
        std::size_t n = sums.size();
        require(static_cast<std::size_t>(packed.size()) == (n + 1) / 2,
                "packed length does not match accumulator");
        check_block(n, block, scales.size());
        check_scales(sc, scales.size());
        py::gil_scoped_release nogil;
        edgefed::acc_dense_int4(s, p, n, sc, block, static_cast<float>(w), threads);
      },
      py::arg("sums"), py::arg("packed"), py::arg("scales"), py::arg("block"), py::arg("weight"),
      py::arg("threads") = 0);

  m.def(
      "acc_sparse",
      [](py::array sums, py::object wsums_obj, py::array idx, py::array values, double scale,
         double w, int threads) {
        float* s = out_ptr<float>(sums, "sums");
        float* ws = nullptr;
        if (!wsums_obj.is_none()) {
          py::array wsums = wsums_obj.cast<py::array>();
          ws = out_ptr<float>(wsums, "weight_sums");
          require(wsums.size() == sums.size(), "weight_sums length does not match sums");
        }
        const uint32_t* ip = in_ptr<uint32_t>(idx, "indices");
        std::size_t n = sums.size(), c = idx.size();
        require(values.size() == idx.size(), "indices and values lengths disagree");
        check_weight(w);
        require(std::isfinite(scale) && scale >= 0.0, "scale must be finite and >= 0");
        check_indices(ip, c, n);
        float fw = static_cast<float>(w);
        if (values.dtype().is(py::dtype::of<float>())) {
          const float* v = in_ptr<float>(values, "values");
          require(edgefed::all_finite(v, c, threads), "values contain NaN or Inf");
          require(scale == 1.0, "float32 values take scale 1.0");
          py::gil_scoped_release nogil;
          edgefed::acc_sparse_f32(s, ws, ip, v, c, fw, threads);
        } else if (values.dtype().is(py::dtype::of<int8_t>())) {
          const int8_t* v = in_ptr<int8_t>(values, "values");
          py::gil_scoped_release nogil;
          edgefed::acc_sparse_int8(s, ws, ip, v, c, static_cast<float>(scale), fw, threads);
        } else if (values.dtype().is(py::dtype("float16"))) {
          require((values.flags() & py::array::c_style) != 0, "values: must be C-contiguous");
          const uint16_t* v = static_cast<const uint16_t*>(values.data());
          for (std::size_t i = 0; i < c; ++i)
            if ((v[i] & 0x7c00u) == 0x7c00u)
              throw edgefed::InvalidArgument("values contain NaN or Inf");
          require(scale == 1.0, "float16 values take scale 1.0");
          py::gil_scoped_release nogil;
          edgefed::acc_sparse_f16(s, ws, ip, v, c, fw, threads);
        } else {
          throw edgefed::InvalidArgument("values: expected float32, float16 or int8");
        }
      },
      py::arg("sums"), py::arg("weight_sums"), py::arg("indices"), py::arg("values"),
      py::arg("scale"), py::arg("weight"), py::arg("threads") = 0,
      "sums[idx] += weight * scale * values; weight_sums[idx] += weight if given.");

  m.def(
      "acc_sparse_batch",
      [](py::array sums, py::object wsums_obj, py::list items, std::size_t chunk, int threads) {
        // items: list of (indices uint32, values f32|f16|i8, scale, weight, absent)
        float* s = out_ptr<float>(sums, "sums");
        const std::size_t n = sums.size();
        float* ws = nullptr;
        if (!wsums_obj.is_none()) {
          py::array wsums = wsums_obj.cast<py::array>();
          ws = out_ptr<float>(wsums, "weight_sums");
          require(static_cast<std::size_t>(wsums.size()) == n,
                  "weight_sums length does not match sums");
        }
        std::vector<edgefed::SparseRef> refs;
        std::vector<py::array> keep;  // hold the arrays alive while the GIL is released
        refs.reserve(items.size());
        for (py::handle h : items) {
          py::tuple tp = h.cast<py::tuple>();
          require(tp.size() == 5, "each item is (indices, values, scale, weight, absent)");
          py::array idx = tp[0].cast<py::array>(), vals = tp[1].cast<py::array>();
          double scale = tp[2].cast<double>(), w = tp[3].cast<double>();
          bool absent = tp[4].cast<bool>();
          const uint32_t* ip = in_ptr<uint32_t>(idx, "indices");
          const std::size_t c = idx.size();
          require(static_cast<std::size_t>(vals.size()) == c,
                  "indices and values lengths disagree");
          check_weight(w);
          require(std::isfinite(scale) && scale >= 0.0, "scale must be finite and >= 0");
          require(!absent || ws != nullptr, "absent-fill updates need weight_sums");
          check_indices(ip, c, n);
          edgefed::SparseRef r{ip, nullptr, c, edgefed::ValueType::kF32,
                               static_cast<float>(w), static_cast<float>(w), absent};
          if (vals.dtype().is(py::dtype::of<float>())) {
            const float* v = in_ptr<float>(vals, "values");
            require(edgefed::all_finite(v, c, 1), "values contain NaN or Inf");
            require(scale == 1.0, "float32 values take scale 1.0");
            r.values = v;
          } else if (vals.dtype().is(py::dtype::of<int8_t>())) {
            r.values = in_ptr<int8_t>(vals, "values");
            r.type = edgefed::ValueType::kI8;
            r.value_weight = static_cast<float>(w * scale);
          } else if (vals.dtype().is(py::dtype("float16"))) {
            require((vals.flags() & py::array::c_style) != 0, "values: must be C-contiguous");
            const uint16_t* v = static_cast<const uint16_t*>(vals.data());
            for (std::size_t i = 0; i < c; ++i)
              if ((v[i] & 0x7c00u) == 0x7c00u)
                throw edgefed::InvalidArgument("values contain NaN or Inf");
            require(scale == 1.0, "float16 values take scale 1.0");
            r.values = v;
            r.type = edgefed::ValueType::kF16;
          } else {
            throw edgefed::InvalidArgument("values: expected float32, float16 or int8");
          }
          refs.push_back(r);
          keep.push_back(idx);
          keep.push_back(vals);
        }
        py::gil_scoped_release nogil;
        edgefed::acc_sparse_batch(s, ws, n, refs.data(), refs.size(), chunk, threads);
      },
      py::arg("sums"), py::arg("weight_sums"), py::arg("items"), py::arg("chunk") = 1 << 15,
      py::arg("threads") = 0,
      "Cache-blocked accumulation of many sparse updates of one tensor (all validated "
      "before any write).");
}
