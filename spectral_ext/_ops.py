"""Every op schema, fake implementation and autograd registration of spectral_ext, in one place.

Ops (namespace ``spectral_ext``):

``fused_step(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam, int n_iter) -> Tensor``
    For every layer: n_iter power iterations from v (v updated in place), then
    ``grads[l] += lam * sigma_l * u_l v_l^T`` in place.  Returns sigma [L].  Not differentiable.

``spectral_norms(Tensor[] weights, Tensor[] vs, int n_iter) -> (Tensor, Tensor[], Tensor[])``
    Functional: ``(sigma [L], us, vs_new)``; mutates nothing.  Differentiable in the weights with
    dsigma_l/dW_l = u_l v_l^T (u, v held constant, as in the paper).

``spectral_norms_backward(Tensor grad_sigma, Tensor[] us, Tensor[] vs, Tensor(a!)[] grads, bool accumulate) -> ()``
    The backward of spectral_norms: ``grads[l] (+)= grad_sigma[l] * u_l v_l^T`` in place for every
    layer (overwritten unless ``accumulate``); one launch per gradient dtype on CUDA.

``fused_step_triton(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam, int n_iter) -> Tensor``
    The same step with the Triton kernels (registered only when Triton imports; float32 sigma).

``spectral_norms_triton`` / ``spectral_norms_backward_triton``
    spectral_norms and its backward with the Triton kernels (same schemas; registered only when
    Triton imports; float32 sigma and us).

Kernels: the C++ extension ``spectral_ext._C`` registers CPU kernels when it loads, and CUDA kernels
of ``fused_step``, ``spectral_norms`` and ``spectral_norms_backward`` when it was built with nvcc
(csrc/cuda/); the pure-PyTorch reference is
registered as the default kernel, so the ops run on any device.  Outputs: sigma is
float32, or float64 if any weight is float64; us are in each layer's accumulation dtype (float64
for float64 weights, else float32); vs_new in the dtype of each v.  Each output is a tensor of
its own (a custom op's outputs may not alias each other): the GPU kernels write u and v into one
buffer per weight dtype and copy them out with one split_with_sizes_copy per buffer.

The autograd formula of spectral_norms runs the fused backward (one launch) on CUDA tensors when
the CUDA kernels are built (the Triton op: its Triton backward), in eager mode; under
torch.compile (traced, then fused by Inductor) and during CUDA-graph capture (the fused backward
builds a table per call) it is the reference formula, as on the CPU.
"""

from __future__ import annotations

import torch

from . import _checks, reference

_LIB = torch.library.Library("spectral_ext", "DEF")
_LIB.define("fused_step(Tensor[] weights, Tensor(a!)[] vs, Tensor(b!)[] grads, float lam, "
            "int n_iter) -> Tensor")
_LIB.define("spectral_norms(Tensor[] weights, Tensor[] vs, int n_iter) "
            "-> (Tensor, Tensor[], Tensor[])")
_LIB.define("spectral_norms_backward(Tensor grad_sigma, Tensor[] us, Tensor[] vs, "
            "Tensor(a!)[] grads, bool accumulate) -> ()")

fused_step = torch.ops.spectral_ext.fused_step
spectral_norms = torch.ops.spectral_ext.spectral_norms
spectral_norms_backward = torch.ops.spectral_ext.spectral_norms_backward


# ---- default kernels: the reference, for every device without a kernel of its own -------------

def _fused_step_default(weights, vs, grads, lam, n_iter):
    weights, vs, grads, lam, n_iter = _checks.check_fused_step_args(weights, vs, grads, lam, n_iter)
    return reference._fused_step_unchecked(weights, vs, grads, lam, n_iter)


def _spectral_norms_default(weights, vs, n_iter):
    weights, vs = _checks.check_weights_and_vectors(weights, vs)
    return reference.spectral_norms_values(weights, vs, _checks.check_n_iter(n_iter))


def _spectral_norms_backward_default(grad_sigma, us, vs, grads, accumulate):
    """The reference formula, one layer at a time (the fallback and the oracle)."""
    with torch.no_grad():
        for i, (u, v, g) in enumerate(zip(us, vs, grads)):
            d = (grad_sigma[i].to(u.dtype) * torch.outer(u, v.to(u.dtype))).reshape(g.shape)
            if accumulate:
                g.add_(d.to(g.dtype))
            else:
                g.copy_(d)


_LIB.impl("fused_step", _fused_step_default, "CompositeExplicitAutograd")
_LIB.impl("spectral_norms", _spectral_norms_default, "CompositeExplicitAutograd")
_LIB.impl("spectral_norms_backward", _spectral_norms_backward_default, "CompositeExplicitAutograd")


# ---- fake (meta) implementations, for torch.compile and FakeTensor ------------------------------

def _sigma_like(weights):
    return weights[0].new_empty((len(weights),), dtype=_checks.sigma_dtype(weights))


@torch.library.register_fake("spectral_ext::fused_step")
def _fused_step_fake(weights, vs, grads, lam, n_iter):
    _checks.check_fused_step_args(weights, vs, grads, lam, n_iter)
    return _sigma_like(weights)


def _new_outputs(weights, vs):
    """us (accumulation dtype) and vs_new (each v's dtype), each a tensor of its own: a custom
    op's outputs may not alias each other, so every backend returns them so."""
    us = [w.new_empty((w.shape[0],), dtype=_checks.acc_dtype(w.dtype)) for w in weights]
    return us, [v.new_empty(v.shape) for v in vs]


@torch.library.register_fake("spectral_ext::spectral_norms")
def _spectral_norms_fake(weights, vs, n_iter):
    _checks.check_weights_and_vectors(weights, vs)
    return (_sigma_like(weights), *_new_outputs(weights, vs))


@torch.library.register_fake("spectral_ext::spectral_norms_backward")
def _spectral_norms_backward_fake(grad_sigma, us, vs, grads, accumulate):
    return None


# ---- autograd of spectral_norms: dsigma_l / dW_l = u_l v_l^T ------------------------------------

def _spectral_norms_setup_context(ctx, inputs, output):
    weights, _, _ = inputs
    _, us, vs_new = output
    ctx.save_for_backward(*us, *vs_new)
    ctx.meta = [(w.shape, w.dtype) for w in weights]
    ctx.device = weights[0].device


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _make_backward(fused_op, fused_available):
    """The autograd formula: u and v are constants (the paper's gradient; grad_us / grad_vs are
    ignored).  ``fused_op`` (one launch for every layer) when ``fused_available(device)`` and
    not compiling or capturing, else the reference formula, one layer at a time."""
    def backward(ctx, grad_sigma, grad_us, grad_vs):
        n = len(ctx.meta)
        saved = ctx.saved_tensors
        us, vs = list(saved[:n]), list(saved[n:])
        if fused_available(ctx.device) and not torch.compiler.is_compiling() \
                and not _capturing(ctx.device):
            grads = [torch.empty(shape, dtype=dtype, device=ctx.device)
                     for shape, dtype in ctx.meta]
            fused_op(grad_sigma, us, vs, grads, False)
            return grads, [None] * n, None
        grads = []
        for i, ((shape, dtype), u, v) in enumerate(zip(ctx.meta, us, vs)):
            g = grad_sigma[i].to(u.dtype) * torch.outer(u, v.to(u.dtype))
            grads.append(g.reshape(shape).to(dtype))
        return grads, [None] * n, None
    return backward


def _cuda_backward_available(device) -> bool:
    return device.type == "cuda" and CUDA_KERNELS_ERROR is None


torch.library.register_autograd("spectral_ext::spectral_norms",
                                _make_backward(spectral_norms_backward, _cuda_backward_available),
                                setup_context=_spectral_norms_setup_context)


# ---- the C++ extension --------------------------------------------------------------------------

#: None when the C++ CPU kernels are registered, else why not.
CPU_EXTENSION_ERROR = None
CPU_OPENMP = False
#: None when the CUDA kernels of fused_step are compiled in and registered, else why not (whether
#: a GPU is present is checked where a backend is chosen, not here).
CUDA_KERNELS_ERROR = None
try:
    from ._build_config import CPU_ARCH  # written by setup.py next to the extension
except ImportError:
    CPU_ARCH = None
try:
    from ._build_config import CUDA_ARCHS
except ImportError:
    CUDA_ARCHS = ""
if CPU_ARCH == "x86-64-v3" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    CPU_EXTENSION_ERROR = ("the C++ extension was built for x86-64-v3 (AVX2/FMA) and this CPU "
                           "lacks AVX2: rebuild with SPECTRAL_EXT_CPU_ARCH= (empty) for a "
                           "portable build")
else:
    try:
        from . import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL(spectral_ext, CPU/CUDA, m))
        # an in-place build older than this package lacks what the Python side calls
        _missing = [f for f in ("plan_step", "dict_is", "lookups_are", "requires_grad_indices")
                    if not hasattr(_C, f)]
        if _missing:
            raise ImportError(f"it is older than this package (no {', '.join(_missing)}): "
                              "rebuild it (make install, or pip install --no-build-isolation .)")
        CPU_OPENMP = bool(_C.openmp())
        if not _C.cuda_compiled():
            CUDA_KERNELS_ERROR = ("spectral_ext was built without its CUDA kernels (no nvcc at "
                                  "build time, or SPECTRAL_EXT_CUDA=0); rebuild with nvcc, e.g. "
                                  "CUDA_HOME=/usr/local/cuda SPECTRAL_EXT_CUDA=1 pip install "
                                  "--no-build-isolation .")
    except ImportError as exc:  # a source checkout that was never built, or a torch ABI mismatch
        CPU_EXTENSION_ERROR = f"the C++ extension spectral_ext._C did not load: {exc}"
if CPU_EXTENSION_ERROR is not None:
    CUDA_KERNELS_ERROR = CPU_EXTENSION_ERROR

#: torch.classes.spectral_ext.CpuStepPlan (csrc/cpu/fused_step_cpu.cpp): the eager fast path of
#: fused_step on CPU tensors (see functional.make_step_plan); None without the C++ extension.
CpuStepPlan = torch.classes.spectral_ext.CpuStepPlan if CPU_EXTENSION_ERROR is None else None
#: torch.classes.spectral_ext.CudaStepPlan (csrc/cuda/binding.cpp): the same for the CUDA kernels;
#: None when they are not compiled in.
CudaStepPlan = torch.classes.spectral_ext.CudaStepPlan if CUDA_KERNELS_ERROR is None else None


#: spectral_ext._C.plan_step(plan, lam, n_iter) (csrc/plan_entry.cpp): plan.step(lam, n_iter)
#: without the custom-class method call (3-4 us of argument handling per call); None without the
#: C++ extension (and then there is no plan).
plan_step = _C.plan_step if CPU_EXTENSION_ERROR is None else None
#: _C.dict_is(d, keys, values) and _C.lookups_are(dicts, keys, values) (csrc/module.cpp): the
#: regularizer's per-step identity tests in C; None without the extension (the Python forms).
dict_is = _C.dict_is if CPU_EXTENSION_ERROR is None else None
lookups_are = _C.lookups_are if CPU_EXTENSION_ERROR is None else None
#: _C.requires_grad_indices(tensors, previous) (csrc/plan_entry.cpp): the regularizer's active
#: set for its plan of the active weights (None without the extension: no plan either)
requires_grad_indices = _C.requires_grad_indices if CPU_EXTENSION_ERROR is None else None


# ---- the Triton backend (optional) --------------------------------------------------------------

#: None when the Triton op is registered, else why not (Triton is an optional dependency).
TRITON_ERROR = None
try:
    from .triton_kernels import fused_step_forward as _triton_fused_step_forward
except ImportError as exc:
    TRITON_ERROR = f"Triton is not importable ({exc}); pip install triton"
else:
    from typing import List

    # An opaque custom op, not torch.library.triton_op: the kernels address the layers through a
    # device table of data pointers (one launch for any number of layers), and a FakeTensor has
    # no data pointer, so torch.compile cannot trace into the host code; it would also not see
    # the writes made through the table.  Opaque, the op keeps a compiled graph whole
    # (fullgraph=True works), with its mutations of vs and grads declared here.
    @torch.library.custom_op("spectral_ext::fused_step_triton", mutates_args=("vs", "grads"))
    def fused_step_triton(weights: List[torch.Tensor], vs: List[torch.Tensor],
                          grads: List[torch.Tensor], lam: float, n_iter: int) -> torch.Tensor:
        """fused_step with the Triton kernels (spectral_ext.triton_kernels): float32, float16 and
        bfloat16 weights; the caller has checked the inputs."""
        return _triton_fused_step_forward(weights, vs, grads, lam, n_iter)

    @fused_step_triton.register_fake
    def _fused_step_triton_fake(weights, vs, grads, lam, n_iter):
        # under torch.compile the Python checks are traced by Dynamo, which cannot follow
        # storages: the memory-overlap check runs here, on the fake tensors
        _checks.check_no_overlap(weights, vs, grads)
        return weights[0].new_empty((len(weights),), dtype=torch.float32)


    # spectral_norms with the Triton kernels: defined like spectral_norms, opaque to
    # torch.compile for the reason given above.
    _LIB.define("spectral_norms_triton(Tensor[] weights, Tensor[] vs, int n_iter) "
                "-> (Tensor, Tensor[], Tensor[])")
    _LIB.define("spectral_norms_backward_triton(Tensor grad_sigma, Tensor[] us, Tensor[] vs, "
                "Tensor(a!)[] grads, bool accumulate) -> ()")
    spectral_norms_triton = torch.ops.spectral_ext.spectral_norms_triton
    spectral_norms_backward_triton = torch.ops.spectral_ext.spectral_norms_backward_triton

    def _spectral_norms_triton_impl(weights, vs, n_iter):
        """spectral_norms with the Triton kernels; the caller has checked the inputs."""
        from .triton_kernels import spectral_norms_forward
        return spectral_norms_forward(weights, vs, n_iter)

    def _spectral_norms_backward_triton_impl(grad_sigma, us, vs, grads, accumulate):
        from .triton_kernels import spectral_norms_backward as _backward
        _backward(grad_sigma, us, vs, grads, accumulate)

    _LIB.impl("spectral_norms_triton", _spectral_norms_triton_impl, "CompositeExplicitAutograd")
    _LIB.impl("spectral_norms_backward_triton", _spectral_norms_backward_triton_impl,
              "CompositeExplicitAutograd")

    @torch.library.register_fake("spectral_ext::spectral_norms_triton")
    def _spectral_norms_triton_fake(weights, vs, n_iter):
        _checks.check_no_overlap(weights, vs, None)
        return (weights[0].new_empty((len(weights),), dtype=torch.float32),
                *_new_outputs(weights, vs))

    @torch.library.register_fake("spectral_ext::spectral_norms_backward_triton")
    def _spectral_norms_backward_triton_fake(grad_sigma, us, vs, grads, accumulate):
        return None

    torch.library.register_autograd(
        "spectral_ext::spectral_norms_triton",
        _make_backward(spectral_norms_backward_triton, lambda device: True),
        setup_context=_spectral_norms_setup_context)
