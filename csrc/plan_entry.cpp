// spectral_ext._C.plan_step(plan, lam, n_iter): a step plan's step (step_plan.h, StepPlan)
// called from Python without torch's custom-class method machinery.
//
// plan.step(lam, n_iter) on the torch.ScriptObject costs 3.5-4.5 us per call before the step
// does anything: the ScriptMethod object made by the attribute lookup, the schema matching, the
// boxing of the arguments into a stack and the return value out of it.  For 512 small layers on
// a GPU that is a third of the whole host path (benchmarks/cuda_host_path.py).  This entry
// unwraps the ScriptObject (one pybind11 cast), finds the StepPlan in its single slot and calls
// it: a whole step of one layer through it costs 1.2-1.3 us (the method: 4.7-4.9 us; emulated
// CUDA binding, benchmarks/RESULTS.md).  The plan is held (a strong reference) for the length of the
// call and the GIL is released while it runs, as for the method call; c10 errors reach Python
// as the same exception types (ValueError, TypeError, RuntimeError).
//
// The real build registers it in spectral_ext._C (module.cpp); the CUDA emulation
// (tests/cuda_emulation.py, -DSPECTRAL_EXT_EMULATE) compiles this file into its own Python
// module, spectral_ext_cuda_emu, with the same function.
#include <Python.h>

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/api/object.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

#include "step_plan.h"

namespace spectral_ext {

namespace {

// The StepPlan inside a ScriptObject of torch.classes.spectral_ext.{Cpu,Cuda}StepPlan, held;
// null (a Python TypeError set) for anything else.
c10::intrusive_ptr<torch::CustomClassHolder> plan_of(PyObject* obj, StepPlan** plan) {
  pybind11::detail::make_caster<torch::jit::Object> caster;
  if (caster.load(pybind11::handle(obj), /*convert=*/false)) {
    const torch::jit::Object& o = pybind11::detail::cast_op<const torch::jit::Object&>(caster);
    const auto ivalue = o._ivalue();
    if (ivalue->slots().size() == 1 && ivalue->slots()[0].isCapsule()) {
      auto held = ivalue->slots()[0].toCapsule();
      if (auto* p = dynamic_cast<StepPlan*>(held.get())) {
        *plan = p;
        return held;
      }
    }
  }
  PyErr_Format(PyExc_TypeError, "plan_step: expected a step plan (the object "
               "spectral_ext.functional.make_step_plan returns), got %s", Py_TYPE(obj)->tp_name);
  return {};
}

}  // namespace

// plan_step(plan, lam: float, n_iter: int) -> Tensor | None, as plan.step(lam, n_iter)
PyObject* plan_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_Format(PyExc_TypeError, "plan_step(plan, lam, n_iter) takes 3 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  StepPlan* plan = nullptr;
  const auto held = plan_of(args[0], &plan);
  if (!held) return nullptr;
  // Python's number conversions, as the method accepts them: lam anything with __float__ (or
  // __index__), n_iter anything with __index__ (an int, a bool, a NumPy integer; not a float)
  const double lam = PyFloat_AsDouble(args[1]);
  if (lam == -1.0 && PyErr_Occurred()) {
    PyErr_Format(PyExc_TypeError, "plan_step: lam must be a float, got %s",
                 Py_TYPE(args[1])->tp_name);
    return nullptr;
  }
  int overflow = 0;
  const long long n_iter = PyLong_AsLongLongAndOverflow(args[2], &overflow);
  if (n_iter == -1 && PyErr_Occurred()) {
    PyErr_Format(PyExc_TypeError, "plan_step: n_iter must be an int, got %s",
                 Py_TYPE(args[2])->tp_name);
    return nullptr;
  }
  if (overflow != 0) {
    PyErr_SetString(PyExc_ValueError, "plan_step: n_iter does not fit in 64 bits");
    return nullptr;
  }
  std::optional<at::Tensor> sigma;
  {
    pybind11::gil_scoped_release no_gil;
    sigma = plan->step(lam, static_cast<int64_t>(n_iter));
  }
  if (!sigma) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(*sigma));
  END_HANDLE_TH_ERRORS
}

// requires_grad_indices(tensors: list[Tensor], previous: tuple | None) -> tuple[int, ...]: the
// indices of the tensors that require grad, in order; `previous` itself when it holds exactly
// those (the regularizer keeps its plan of the active weights while this returns the same
// object).  The Python form, [i for i, p in enumerate(ps) if p.requires_grad], costs 40 us for
// 512 Parameters (an attribute lookup through the Parameter subclass each); this reads the
// TensorImpls.
PyObject* requires_grad_indices(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !PyList_Check(args[0]) || (args[1] != Py_None && !PyTuple_Check(args[1]))) {
    PyErr_SetString(PyExc_TypeError, "requires_grad_indices(tensors, previous): a list of "
                    "tensors and a tuple or None");
    return nullptr;
  }
  PyObject* list = args[0];
  PyObject* previous = args[1];
  const Py_ssize_t n = PyList_GET_SIZE(list);
  std::vector<Py_ssize_t> active;
  active.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = PyList_GET_ITEM(list, i);
    if (!THPVariable_Check(t)) {
      PyErr_Format(PyExc_TypeError, "requires_grad_indices: item %zd is a %s, not a tensor", i,
                   Py_TYPE(t)->tp_name);
      return nullptr;
    }
    if (THPVariable_Unpack(t).requires_grad()) active.push_back(i);
  }
  if (previous != Py_None && PyTuple_GET_SIZE(previous) == static_cast<Py_ssize_t>(active.size())) {
    bool same = true;
    for (size_t k = 0; same && k < active.size(); ++k) {
      PyObject* x = PyTuple_GET_ITEM(previous, k);
      same = PyLong_CheckExact(x) && PyLong_AsSsize_t(x) == active[k];
    }
    if (PyErr_Occurred()) return nullptr;
    if (same) {
      Py_INCREF(previous);
      return previous;
    }
  }
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(active.size()));
  if (out == nullptr) return nullptr;
  for (size_t k = 0; k < active.size(); ++k) {
    PyObject* x = PyLong_FromSsize_t(active[k]);
    if (x == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(k), x);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

}  // namespace spectral_ext

#ifdef SPECTRAL_EXT_EMULATE
// The emulation's Python module (tests/cuda_emulation.py loads it with is_python_module=True;
// importing it also registers torch.ops.spectral_ext_emu and its CudaStepPlan class).
static PyMethodDef emu_methods[] = {
    {"plan_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(spectral_ext::plan_step)),
     METH_FASTCALL, "plan_step(plan, lam, n_iter): plan.step(lam, n_iter) without torchbind"},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef emu_module = {PyModuleDef_HEAD_INIT, "spectral_ext_cuda_emu", nullptr, -1,
                                 emu_methods};
PyMODINIT_FUNC PyInit_spectral_ext_cuda_emu(void) { return PyModule_Create(&emu_module); }
#endif
