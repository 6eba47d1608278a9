// The Python module `dymu_kernels._C`. It only reports how the extension was built: the ops
// live in their own files (light ATen headers, TORCH_LIBRARY_FRAGMENT(dymu, ...)) and register
// with the dispatcher when this shared object is loaded. Plain CPython API instead of
// torch/extension.h + pybind11: this file compiles in about a second instead of 40-80 s.
#include <Python.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef DYMU_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* openmp_max_threads(PyObject*, PyObject*) {
#ifdef _OPENMP
  return PyLong_FromLong(omp_get_max_threads());
#else
  return PyLong_FromLong(1);
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA sources in csrc/ were compiled in."},
    {"openmp_max_threads", openmp_max_threads, METH_NOARGS, "OpenMP threads the CPU kernels may use (1 without OpenMP)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "dymu-kernels native backend (C++ CPU kernels, optional CUDA)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
