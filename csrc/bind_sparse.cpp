// Bindings for top-k, error feedback, index coding and aggregation (codec work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_sparse(py::module_& m) { (void)m; }
