// The Python module spectral_ext._C.  Importing it registers the kernels (TORCH_LIBRARY_IMPL in
// csrc/cpu/ and csrc/cuda/binding.cpp; the schemas are defined in spectral_ext/_ops.py).  Its
// functions describe the build, and plan_step (plan_entry.cpp) is the step plans' fast
// call.  Only Python.h here: this file compiles in a second.
#include <Python.h>

#include <cstdint>

#include "build_info.h"

namespace spectral_ext {
bool cpu_openmp();
PyObject* plan_step(PyObject* module, PyObject* const* args, Py_ssize_t nargs);   // plan_entry.cpp
#ifdef SPECTRAL_EXT_WITH_CUDA
namespace cuda {
void runtime_info(int* runtime_version, int* driver_version, int* device_count);
int64_t cached_plans();
int64_t pinned_plans();
void clear_plans();
int launch_mode_index();
void set_launch_mode_index(int mode);
}  // namespace cuda
#endif
}  // namespace spectral_ext


static PyObject* openmp(PyObject*, PyObject*) { return PyBool_FromLong(spectral_ext::cpu_openmp()); }

static PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef SPECTRAL_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* cuda_archs(PyObject*, PyObject*) {
  return PyUnicode_FromString(SPECTRAL_EXT_CUDA_ARCHS);
}

// (runtime version, driver version, device count) as this module's CUDA runtime sees them;
// None when the CUDA kernels were not compiled in.  Never fails: (v, 0, 0) without a GPU.
static PyObject* cuda_runtime(PyObject*, PyObject*) {
#ifdef SPECTRAL_EXT_WITH_CUDA
  int rt = 0, drv = 0, n = 0;
  spectral_ext::cuda::runtime_info(&rt, &drv, &n);
  return Py_BuildValue("(iii)", rt, drv, n);
#else
  Py_RETURN_NONE;
#endif
}

// the CUDA layer tables cached so far (tests), those pinned by graphs, and dropping the others
static PyObject* cuda_cached_plans(PyObject*, PyObject*) {
#ifdef SPECTRAL_EXT_WITH_CUDA
  return PyLong_FromLongLong(spectral_ext::cuda::cached_plans());
#else
  return PyLong_FromLong(0);
#endif
}

static PyObject* cuda_pinned_plans(PyObject*, PyObject*) {
#ifdef SPECTRAL_EXT_WITH_CUDA
  return PyLong_FromLongLong(spectral_ext::cuda::pinned_plans());
#else
  return PyLong_FromLong(0);
#endif
}

static PyObject* cuda_clear_plans(PyObject*, PyObject*) {
#ifdef SPECTRAL_EXT_WITH_CUDA
  spectral_ext::cuda::clear_plans();
#endif
  Py_RETURN_NONE;
}

// cuda_launch_mode() -> 0 (kernel per pass) or 1 (one kernel per step); cuda_launch_mode(m) sets
// it (spectral_ext.set_cuda_launch_mode checks m).  Always 0 without the CUDA kernels.
static PyObject* cuda_launch_mode(PyObject*, PyObject* args) {
  int mode = -1;
  if (!PyArg_ParseTuple(args, "|i", &mode)) return nullptr;
#ifdef SPECTRAL_EXT_WITH_CUDA
  if (mode >= 0) spectral_ext::cuda::set_launch_mode_index(mode);
  return PyLong_FromLong(spectral_ext::cuda::launch_mode_index());
#else
  return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"openmp", openmp, METH_NOARGS, "whether the CPU kernels were compiled with OpenMP"},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "whether the CUDA kernels were compiled in"},
    {"cuda_archs", cuda_archs, METH_NOARGS, "TORCH_CUDA_ARCH_LIST the CUDA kernels were built for"},
    {"cuda_runtime", cuda_runtime, METH_NOARGS,
     "(cudart version, driver version, device count) seen by the CUDA kernels' runtime"},
    {"cuda_cached_plans", cuda_cached_plans, METH_NOARGS, "number of cached CUDA layer tables"},
    {"cuda_pinned_plans", cuda_pinned_plans, METH_NOARGS,
     "number of cached CUDA layer tables pinned by captured CUDA graphs"},
    {"cuda_clear_plans", cuda_clear_plans, METH_NOARGS,
     "drop the cached CUDA layer tables that no captured graph uses"},
    {"cuda_launch_mode", cuda_launch_mode, METH_VARARGS,
     "the CUDA launch mode (0: a kernel per pass, 1: one kernel per step); with an argument, set it"},
    {"plan_step",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(spectral_ext::plan_step)),
     METH_FASTCALL,
     "plan_step(plan, lam, n_iter): plan.step(lam, n_iter) of a step plan "
     "(functional.make_step_plan) without the custom-class method call's overhead"},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
