// The Python module spectral_ext._C.  Importing it registers the kernels (TORCH_LIBRARY_IMPL in
// csrc/cpu/ and csrc/cuda/binding.cpp; the schemas are defined in spectral_ext/_ops.py).  Its
// functions describe the build, and plan_step (plan_entry.cpp) is the step plans' fast
// call.  Only Python.h here: this file compiles in a second.
#include <Python.h>

#include <cstdint>

#include "build_info.h"

namespace spectral_ext {
bool cpu_openmp();
// plan_entry.cpp
PyObject* plan_step(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
PyObject* requires_grad_indices(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
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

// ---- identity tests of the regularizer's per-step binding check (spectral_ext/regularizer.py) ----
// The same answers as the Python expressions they replace, in one C loop: for 512 weights the
// Python forms cost 5-20 us each per step, which on a GPU is more than the step's kernels.
// They read dicts with borrowed references and run no Python code (keys are compared only when
// both are exact str), so nothing can change a dict while it is walked.

static bool check_args(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t n) {
  if (nargs != n) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, n, nargs);
    return false;
  }
  return true;
}

// Whether a and b are the same str (a key test: no Python code runs)
static bool same_key(PyObject* a, PyObject* b) {
  if (a == b) return true;
  return PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b) && PyUnicode_Compare(a, b) == 0;
}

// dict_is(d, keys, values) -> bool | None: whether d's items are, in order, keys[i] (equal str)
// -> values[i] (the same object); keys None: the values alone.  (len(d) == len(values),
// list(d) == keys and all(map(operator.is_, d.values(), values)).)  None (cannot tell here) for
// anything but a plain dict: a subclass's own order (OrderedDict.move_to_end) may differ from
// the storage's that PyDict_Next walks; the caller then asks Python.
static PyObject* dict_is(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("dict_is", args, nargs, 3)) return nullptr;
  PyObject *d = args[0], *keys = args[1], *values = args[2];
  if (!PyList_Check(values) || (keys != Py_None && !PyList_Check(keys))) {
    PyErr_SetString(PyExc_TypeError, "dict_is(d, keys, values): keys (or None) and values must "
                    "be lists");
    return nullptr;
  }
  if (!PyDict_CheckExact(d)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(values);
  if (PyDict_GET_SIZE(d) != n || (keys != Py_None && PyList_GET_SIZE(keys) != n)) {
    Py_RETURN_FALSE;
  }
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(d, &pos, &k, &v)) {
    if (i >= n || v != PyList_GET_ITEM(values, i) ||
        (keys != Py_None && !same_key(k, PyList_GET_ITEM(keys, i)))) {
      Py_RETURN_FALSE;
    }
    ++i;
  }
  return PyBool_FromLong(i == n);
}

// lookups_are(dicts, keys, values) -> bool: dicts[i].get(keys[i]) is values[i] for every i
// (dict.get's lookup: a dict subclass's own __getitem__ is not called), the three lists of one
// length.
static PyObject* lookups_are(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("lookups_are", args, nargs, 3)) return nullptr;
  PyObject *dicts = args[0], *keys = args[1], *values = args[2];
  if (!PyList_Check(dicts) || !PyList_Check(keys) || !PyList_Check(values)) {
    PyErr_SetString(PyExc_TypeError, "lookups_are(dicts, keys, values): three lists");
    return nullptr;
  }
  if (PyList_GET_SIZE(keys) != PyList_GET_SIZE(dicts) ||
      PyList_GET_SIZE(values) != PyList_GET_SIZE(dicts)) {
    PyErr_SetString(PyExc_ValueError, "lookups_are(dicts, keys, values): lists of one length");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    PyObject* k = PyList_GET_ITEM(keys, i);
    if (!PyDict_Check(d) || !PyUnicode_CheckExact(k)) {
      PyErr_SetString(PyExc_TypeError, "lookups_are: dicts must hold dicts and keys str");
      return nullptr;
    }
    // A str key's lookup runs no Python code unless the dict holds a non-str key of the same
    // hash (whose __eq__ could change the lists): d and k are held, and the sizes read again.
    Py_INCREF(d);
    Py_INCREF(k);
    PyObject* found = PyDict_GetItemWithError(d, k);   // borrowed; nullptr: missing or error
    const bool failed = found == nullptr && PyErr_Occurred();
    Py_DECREF(k);
    Py_DECREF(d);
    if (failed) return nullptr;
    if (i >= PyList_GET_SIZE(values)) Py_RETURN_FALSE;
    // compared, never followed (dict.get's default: None for a missing key)
    if ((found != nullptr ? found : Py_None) != PyList_GET_ITEM(values, i)) Py_RETURN_FALSE;
    if (PyList_GET_SIZE(dicts) != n || PyList_GET_SIZE(keys) != n) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
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
    {"dict_is", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dict_is)),
     METH_FASTCALL,
     "dict_is(d, keys, values): d's items are keys (or None) -> values, in order; None for a "
     "dict subclass (cannot tell)"},
    {"lookups_are", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lookups_are)),
     METH_FASTCALL, "lookups_are(dicts, keys, values): dicts[i].get(keys[i]) is values[i] for all i"},
    {"requires_grad_indices",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(spectral_ext::requires_grad_indices)),
     METH_FASTCALL,
     "requires_grad_indices(tensors, previous): the indices of the tensors that require grad "
     "(previous itself when the same)"},
    {"plan_step",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(spectral_ext::plan_step)),
     METH_FASTCALL,
     "plan_step(plan, lam, n_iter): plan.step(lam, n_iter) of a step plan "
     "(functional.make_step_plan) without the custom-class method call's overhead"},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
