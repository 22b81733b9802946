// dldna_fused._C: an empty Python module whose import loads the shared library, and with it the
// op registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL run as static initializers). No pybind11:
// every entry point is a torch op.

#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "Loads the dldna_fused ops into torch.ops.dldna_fused.", -1,
      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
