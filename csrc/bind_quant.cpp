// Bindings for the quantization kernels (edgefed._core.quant). Every argument is validated
// here, before any memory is touched; the GIL is released while the kernels run.
// This is the low-level layer: edgefed/quant.py builds the arrays and is the public API.
// Arrays must be C-contiguous, 4-byte aligned (float32) and of the exact dtype: this layer
// rejects anything else (the Python layer copies inputs where that is safe).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "quantize.h"

namespace py = pybind11;
using edgefed::require;
namespace q = edgefed::quant;

namespace {

bool is_dtype(const py::array& a, const py::dtype& d) { return a.dtype().equal(d); }

void check_array(const py::array& a, const std::string& what, bool writeable) {
  require(a.flags() & py::array::c_style, what + " must be C-contiguous");
  require(reinterpret_cast<std::uintptr_t>(a.data()) % a.itemsize() == 0,
          what + " is misaligned (address not a multiple of its item size)");
  if (writeable) require(a.writeable(), what + " is read-only");
}

std::size_t numel(const py::array& a) {
  // Overflow-checked element count (a stride-trick view can claim any shape); saturates.
  std::size_t n = 1;
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (__builtin_mul_overflow(n, static_cast<std::size_t>(a.shape(i)), &n)) return SIZE_MAX;
  return n;
}

void check_float_input(const py::array& x, const std::string& name) {
  q::check_size(numel(x));
  if (!is_dtype(x, py::dtype::of<float>()))  // message built only on failure (py::str is slow)
    throw edgefed::InvalidArgument(name + " must be float32, got " +
                                   std::string(py::str(x.dtype())));
  check_array(x, name, false);
  require(x.size() > 0, name + " is empty");
}

std::vector<std::size_t> shape_of(const py::array& a) {
  std::vector<std::size_t> s(a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<std::size_t>(a.shape(i));
  return s;
}

q::Layout make_layout(const py::array& x, const py::object& axis, std::int64_t block) {
  q::Layout L;
  const auto shape = shape_of(x);
  if (axis.is_none()) {
    require(block == 0, "block_size needs an axis");
    L.inner = x.size();
    return L;
  }
  const auto ax = axis.cast<std::int64_t>();
  require(ax >= 0 && ax < static_cast<std::int64_t>(shape.size()),
          "axis " + std::to_string(ax) + " is out of range for a tensor with " +
              std::to_string(shape.size()) + " dimensions");
  for (std::int64_t i = 0; i < ax; ++i) L.outer *= shape[i];
  L.len = shape[ax];
  for (std::size_t i = ax + 1; i < shape.size(); ++i) L.inner *= shape[i];
  if (block == 0) {
    L.gran = q::Granularity::PerAxis;
  } else {
    require(block > 0, "block_size must be positive, got " + std::to_string(block));
    L.gran = q::Granularity::Blocked;
    L.block = static_cast<std::size_t>(block);
  }
  return L;
}

struct QRange {
  bool is_signed;
  float qmin, qmax;
};

QRange qrange_of(const py::array& qa, const std::string& what) {
  if (is_dtype(qa, py::dtype::of<std::int8_t>())) return {true, -128.f, 127.f};
  if (is_dtype(qa, py::dtype::of<std::uint8_t>())) return {false, 0.f, 255.f};
  throw edgefed::InvalidArgument(what + " must be int8 or uint8, got " +
                                 std::string(py::str(qa.dtype())));
}

// Scales / zero points arrive as float32 arrays of nscales() elements.
void check_params(const py::array& s, const py::array& z, const q::Layout& L, const QRange& r,
                  bool writeable) {
  for (const auto* p : {&s, &z}) {
    const std::string what = p == &s ? "scale" : "zero_point";
    require(is_dtype(*p, py::dtype::of<float>()), what + " must be float32 at this layer");
    check_array(*p, what, writeable);
    require(static_cast<std::size_t>(p->size()) == L.nscales(),
            what + " has " + std::to_string(p->size()) + " elements, the layout needs " +
                std::to_string(L.nscales()));
  }
  if (writeable) return;
  const float* sp = static_cast<const float*>(s.data());
  const float* zp = static_cast<const float*>(z.data());
  for (std::size_t i = 0; i < L.nscales(); ++i) {
    if (!(sp[i] > 0.f) || !std::isfinite(sp[i])) {
      std::ostringstream m;
      m << "scale must be positive and finite, got " << sp[i] << " at index " << i;
      throw edgefed::InvalidArgument(m.str());
    }
    if (!(zp[i] >= r.qmin && zp[i] <= r.qmax) || zp[i] != std::nearbyint(zp[i])) {
      std::ostringstream m;
      m << "zero_point must be an integer in [" << r.qmin << ", " << r.qmax << "], got " << zp[i]
        << " at index " << i;
      throw edgefed::InvalidArgument(m.str());
    }
  }
}

[[noreturn]] void raise_nonfinite(const py::array& x, const std::string& name, std::int64_t i,
                                  const char* advice) {
  const float v = static_cast<const float*>(x.data())[i];
  std::ostringstream m;
  m << name << " contains " << (std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf"))
    << " at index (";
  std::int64_t rest = i;
  std::vector<std::int64_t> idx(x.ndim());
  for (py::ssize_t d = x.ndim() - 1; d >= 0; --d) {
    idx[d] = rest % x.shape(d);
    rest /= x.shape(d);
  }
  for (std::size_t d = 0; d < idx.size(); ++d) m << (d ? ", " : "") << idx[d];
  m << (idx.size() == 1 ? ",)" : ")") << " (flat index " << i << "); " << advice;
  throw q::NonFiniteInput(m.str());
}

int check_threads(int threads) {
  require(threads >= 0 && threads <= 1024,
          "threads must be in [0, 1024] (0 = all cores), got " + std::to_string(threads));
  return threads;
}

void check_out(const py::array& out, const py::array& like, const std::string& what) {
  check_array(out, what, true);
  require(shape_of(out) == shape_of(like), what + " has the wrong shape");
}

}  // namespace

void register_quant(py::module_& m) {
  static py::exception<q::NonFiniteInput> nonfinite(m, "NonFiniteError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const q::NonFiniteInput& e) {
      py::set_error(nonfinite, e.what());
    }
  });

  m.attr("MAX_ELEMENTS") = py::int_(q::kMaxElements);

  m.def("check_size", [](std::size_t n) { q::check_size(n); }, py::arg("numel"),
        "Raise ValueError if a tensor of numel elements is too large.");

  m.def("best_isa", &q::best_isa_name, "ISA the 'auto' dispatch picks on this CPU.");

  m.def(
      "available_isas",
      [] {
        std::vector<std::string> out;
        for (const char* name : {"generic", "sse2", "avx2", "avx512", "neon"})
          if (q::isa_available(q::parse_isa(name))) out.emplace_back(name);
        return out;
      },
      "ISAs usable on this CPU and build.");

  m.def("stochastic_uniform", &q::stochastic_uniform, py::arg("seed"), py::arg("index"),
        "The counter-based uniform [0, 1) used by stochastic rounding (for tests).");

  m.def(
      "quantize",
      [](const py::array& x, py::array& out, const py::array& scale, const py::array& zp,
         const py::object& axis, std::int64_t block, bool stochastic, std::uint64_t seed,
         int threads, bool allow_nonfinite, const std::string& name, const std::string& isa) {
        check_float_input(x, name);
        const QRange r = qrange_of(out, "out");
        check_out(out, x, "out");
        const q::Layout L = make_layout(x, axis, block);
        check_params(scale, zp, L, r, false);
        const q::Kernels& k = q::select_kernels(q::parse_isa(isa));
        q::QuantParams p{r.qmin, r.qmax, stochastic, seed};
        check_threads(threads);
        std::int64_t bad = -1;
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = q::quantize(k, static_cast<const float*>(x.data()), L,
                           static_cast<const float*>(scale.data()),
                           static_cast<const float*>(zp.data()), p,
                           static_cast<std::uint8_t*>(out.mutable_data()), threads,
                           allow_nonfinite, &bad);
        }
        if (!ok)
          raise_nonfinite(x, name, bad,
                          "NaN and Inf are rejected by default (allow_nonfinite=True saturates "
                          "them)");
      },
      py::arg("x"), py::arg("out"), py::arg("scale"), py::arg("zero_point"), py::arg("axis"),
      py::arg("block_size"), py::arg("stochastic"), py::arg("seed"), py::arg("threads"),
      py::arg("allow_nonfinite"), py::arg("name"), py::arg("isa"));

  m.def(
      "quantize_dynamic",
      [](const py::array& x, py::array& out, py::array& scale, py::array& zp,
         const py::object& axis, std::int64_t block, bool symmetric, bool stochastic,
         std::uint64_t seed, int threads, const std::string& name, const std::string& isa) {
        check_float_input(x, name);
        const QRange r = qrange_of(out, "out");
        check_out(out, x, "out");
        require(!symmetric || r.is_signed, "symmetric quantization needs int8 output");
        const q::Layout L = make_layout(x, axis, block);
        check_params(scale, zp, L, r, true);
        const q::Kernels& k = q::select_kernels(q::parse_isa(isa));
        q::QuantParams p{r.qmin, r.qmax, stochastic, seed};
        check_threads(threads);
        std::int64_t bad = -1;
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = q::quantize_dynamic(k, static_cast<const float*>(x.data()), L, symmetric, p,
                                   static_cast<float*>(scale.mutable_data()),
                                   static_cast<float*>(zp.mutable_data()),
                                   static_cast<std::uint8_t*>(out.mutable_data()), threads, &bad);
        }
        if (!ok) raise_nonfinite(x, name, bad, "scales cannot be computed from NaN or Inf");
      },
      py::arg("x"), py::arg("out"), py::arg("scale_out"), py::arg("zero_point_out"),
      py::arg("axis"), py::arg("block_size"), py::arg("symmetric"), py::arg("stochastic"),
      py::arg("seed"), py::arg("threads"), py::arg("name"), py::arg("isa"));

  m.def(
      "compute_scales",
      [](const py::array& x, py::array& scale, py::array& zp, const py::object& axis,
         std::int64_t block, bool symmetric, bool is_signed, int threads,
         const std::string& name, const std::string& isa) {
        check_float_input(x, name);
        const QRange r = is_signed ? QRange{true, -128.f, 127.f} : QRange{false, 0.f, 255.f};
        require(!symmetric || r.is_signed, "symmetric quantization needs int8 output");
        const q::Layout L = make_layout(x, axis, block);
        check_params(scale, zp, L, r, true);
        const q::Kernels& k = q::select_kernels(q::parse_isa(isa));
        check_threads(threads);
        std::int64_t bad = -1;
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = q::compute_scales(k, static_cast<const float*>(x.data()), L, symmetric, r.qmin,
                                 r.qmax, static_cast<float*>(scale.mutable_data()),
                                 static_cast<float*>(zp.mutable_data()), threads, &bad);
        }
        if (!ok) raise_nonfinite(x, name, bad, "scales cannot be computed from NaN or Inf");
      },
      py::arg("x"), py::arg("scale_out"), py::arg("zero_point_out"), py::arg("axis"),
      py::arg("block_size"), py::arg("symmetric"), py::arg("is_signed"), py::arg("threads"),
      py::arg("name"), py::arg("isa"));

  m.def(
      "dequantize",
      [](const py::array& qa, py::array& out, const py::array& scale, const py::array& zp,
         const py::object& axis, std::int64_t block, int threads, const std::string& isa) {
        q::check_size(numel(qa));
        const QRange r = qrange_of(qa, "q");
        check_array(qa, "q", false);
        require(qa.size() > 0, "q is empty");
        require(is_dtype(out, py::dtype::of<float>()), "out must be float32");
        check_out(out, qa, "out");
        const q::Layout L = make_layout(qa, axis, block);
        check_params(scale, zp, L, r, false);
        const q::Kernels& k = q::select_kernels(q::parse_isa(isa));
        check_threads(threads);
        {
          py::gil_scoped_release nogil;
          q::dequantize(k, static_cast<const std::uint8_t*>(qa.data()), r.is_signed, L,
                        static_cast<const float*>(scale.data()),
                        static_cast<const float*>(zp.data()),
                        static_cast<float*>(out.mutable_data()), threads);
        }
      },
      py::arg("q"), py::arg("out"), py::arg("scale"), py::arg("zero_point"), py::arg("axis"),
      py::arg("block_size"), py::arg("threads"), py::arg("isa"));
}
