// The Python extension edgefed._core: one submodule per kernel family.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

void register_quant(py::module_& m);   // bind_quant.cpp
void register_sparse(py::module_& m);  // bind_sparse.cpp

PYBIND11_MODULE(_core, m) {
  m.doc() = "edgefed C++ kernels: int8/int4 quantization, top-k with error feedback, aggregation";
  m.attr("__version__") = EDGEFED_VERSION;
  py::register_exception<edgefed::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  auto quant = m.def_submodule("quant", "int8 / int4 quantize and dequantize (ONNX semantics)");
  register_quant(quant);
  auto sparse = m.def_submodule("sparse", "top-k, error feedback, index coding, aggregation");
  register_sparse(sparse);
}
