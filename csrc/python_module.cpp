// The Python extension module jitrope._C. It holds no functions: importing it loads this shared
// library, whose static TORCH_LIBRARY initialisers register the torch.ops.jitrope.* operators.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "jitrope's operator library (see torch.ops.jitrope)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
