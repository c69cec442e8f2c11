// Python module entry of halrp_fast._C.  The module defines no Python functions: importing it loads the
// shared library, whose static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks register the private _halrp_C ops.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of halrp_fast (see halrp_fast._ext).",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
