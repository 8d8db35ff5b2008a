// The Python module `pyops._C`: importing it loads this library, whose static initializers
// register the torch ops (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other bindings).
// It has no Python methods (same pattern as pytorch/extension-cpp).
#include <Python.h>

#include <string>
#include <vector>

#include <torch/library.h>

#include "pyops/common.h"  // pyops_cuda_archs

namespace {

// pyops::_cuda_archs() -> str[]: compute capabilities the kernels were built for ("90", "100");
// read by pyops/_backend.py to refuse a device the build cannot run on.
std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = pyops_cuda_archs(); *p; ++p) {
    if (*p == ';') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += *p;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("_cuda_archs() -> str[]", &cuda_archs);
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      NULL,  // m_doc
      -1,    // m_size
      NULL,  // m_methods
      NULL,  // m_slots
      NULL,  // m_traverse
      NULL,  // m_clear
      NULL,  // m_free
  };
  return PyModule_Create(&module_def);
}
}
