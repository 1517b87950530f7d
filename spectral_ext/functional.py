"""The functional API: ``fused_step``, ``spectral_norms`` and backend selection.

Data flows one way: this module -> op (``torch.ops.spectral_ext``, see ``_ops.py``) -> kernel.
The backend is chosen explicitly; ``resolve_backend`` tells which one "auto" picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import functools
import os
import re

import torch

from . import _checks, _ops, distributed, reference

__all__ = ["fused_step", "spectral_norms", "available_backends", "resolve_backend", "Backend",
           "BACKENDS"]

#: every backend name ``fused_step`` accepts besides "auto"
BACKENDS = ("reference", "cpu", "cuda", "triton")

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_status() -> Tuple[bool, str]:
    """(can run here, what it is or why not) for the Triton backend."""
    if _ops.TRITON_ERROR is not None:
        return False, _ops.TRITON_ERROR
    if torch.cuda.is_available():
        return True, "Triton kernels for CUDA tensors (float32/float16/bfloat16 weights)"
    if _triton_interpret():
        return True, ("Triton kernels in the interpreter (TRITON_INTERPRET=1): CPU tensors, "
                      "slow; for tests")
    return False, ("no CUDA GPU here (TRITON_INTERPRET=1 runs the kernels in Triton's "
                   "interpreter on CPU tensors)")


def _arch_list() -> List[Tuple[int, int, bool, bool]]:
    """(major, minor, arch-specific "a" variant, with PTX) per entry of the build's arch list."""
    out = []
    for item in re.split(r"[;/\s]+", _ops.CUDA_ARCHS.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), bool(m.group(3)), bool(m.group(4))))
    return out


# Dynamo (a compiled regularizer step) must not trace this: it would guard on the regex module's
# cache, whose eviction later fails the guard itself (StopIteration, seen on an H100).  Its
# result is a property of the build and the device, constant for the process.
@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _cuda_arch_error(index: int) -> Optional[str]:
    """None if the compiled CUDA kernels run on GPU ``index``, else why not.  A binary for
    sm_XY runs on X.Z with Z >= Y (not on "a" variants' other GPUs); PTX for X.Y runs on any
    GPU of compute capability >= X.Y (compiled by the driver)."""
    cap = torch.cuda.get_device_capability(index)
    for major, minor, specific, ptx in _arch_list():
        if (major, minor) == cap or (not specific and major == cap[0] and minor <= cap[1]):
            return None
        if ptx and not specific and (major, minor) <= cap:
            return None
    return (f"the CUDA kernels were built for TORCH_CUDA_ARCH_LIST={_ops.CUDA_ARCHS!r}, which "
            f"does not cover {torch.cuda.get_device_name(index)} (compute capability "
            f"{cap[0]}.{cap[1]}); rebuild with it in TORCH_CUDA_ARCH_LIST")


# the oldest driver branch for each major CUDA version (CUDA's minor version compatibility)
_DRIVER_BRANCH = {11: "R450", 12: "R525", 13: "R580"}


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _cuda_driver_error() -> Optional[str]:
    """None if the GPU driver can run the CUDA kernels, else why not.  The kernels carry the
    CUDA runtime they were built with (linked statically), which needs a driver of at least the
    same major CUDA version: CUDA 13 needs R580 or newer.  Asked once per process."""
    from . import _C
    runtime, driver, devices = _C.cuda_runtime()

    def version(v):
        return f"{v // 1000}.{v % 1000 // 10}"
    if driver // 1000 < runtime // 1000:
        branch = _DRIVER_BRANCH.get(runtime // 1000, "a newer driver")
        return (f"the CUDA kernels carry the CUDA {version(runtime)} runtime (static), which needs "
                f"a driver for CUDA {runtime // 1000}.0 or newer ({branch}+); this driver "
                + (f"supports CUDA {version(driver)}" if driver else "was not found")
                + ": update the driver, or use backend='triton'")
    if devices == 0:
        return (f"the CUDA kernels' runtime (CUDA {version(runtime)}, driver for CUDA "
                f"{version(driver)}) sees no GPU")
    return None


def _cuda_status() -> Tuple[bool, str]:
    """(can run here, what it is or why not) for the CUDA backend."""
    if _ops.CUDA_KERNELS_ERROR is not None:
        return False, _ops.CUDA_KERNELS_ERROR
    if not torch.cuda.is_available():
        return False, (f"no CUDA GPU here (the CUDA kernels are compiled in, for "
                       f"TORCH_CUDA_ARCH_LIST={_ops.CUDA_ARCHS!r})")
    driver = _cuda_driver_error()
    if driver is not None:
        return False, driver
    return True, (f"C++/CUDA kernels for CUDA tensors (built for {_ops.CUDA_ARCHS!r}; "
                  "float32/float64/float16/bfloat16 weights)")


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    detail: str  # what it is, or why it cannot run here


def available_backends() -> Dict[str, Backend]:
    """Each backend, whether it can run in this process, and why not."""
    out = {"reference": Backend("reference", True, "pure PyTorch, any device (spectral_ext.reference)")}
    if _ops.CPU_EXTENSION_ERROR is None:
        threads = torch.get_num_threads()
        omp = (f"OpenMP, {threads} threads" if _ops.CPU_OPENMP
               else "built WITHOUT OpenMP: single-threaded")
        arch = f"-march={_ops.CPU_ARCH}" if _ops.CPU_ARCH else "portable build"
        out["cpu"] = Backend("cpu", True, f"C++ kernel for CPU tensors ({omp}, {arch})")
    else:
        out["cpu"] = Backend("cpu", False, _ops.CPU_EXTENSION_ERROR)
    out["cuda"] = Backend("cuda", *_cuda_status())
    out["triton"] = Backend("triton", *_triton_status())
    return out


def _check_backend_name(backend: str) -> None:
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of "
                         f"{', '.join(repr(b) for b in ('auto',) + BACKENDS)}")


def resolve_backend(weights: Sequence[torch.Tensor], backend: str = "auto") -> str:
    """The concrete backend that ``backend`` means for these weights; raises if it cannot run."""
    _check_backend_name(backend)
    # No weights: nothing to place, so only the name and the build are checked (a regularizer
    # checks its backend before the model may be moved; an empty step runs the reference).
    device = weights[0].device if len(weights) else None
    if backend == "auto":
        if device is None:
            return "cpu" if _ops.CPU_EXTENSION_ERROR is None else "reference"
        if device.type == "cpu" and _ops.CPU_EXTENSION_ERROR is None:
            return "cpu"
        if device.type == "cuda" and _cuda_status()[0] and _cuda_arch_error(device.index) is None:
            return "cuda"
        if device.type == "cuda" and _ops.TRITON_ERROR is None and \
                all(w.dtype in _TRITON_DTYPES for w in weights):
            return "triton"
        return "reference"
    if backend == "cuda":
        ok, detail = _cuda_status()
        if not ok:
            raise RuntimeError(f"backend 'cuda' is unavailable: {detail}")
        if device is None:
            return backend
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, but the weights are on {device}")
        arch = _cuda_arch_error(device.index)
        if arch is not None:
            raise RuntimeError(f"backend 'cuda' cannot run on {device}: {arch}")
    if backend == "cpu":
        if _ops.CPU_EXTENSION_ERROR is not None:
            raise RuntimeError(f"backend 'cpu' is unavailable: {_ops.CPU_EXTENSION_ERROR}")
        if device is not None and device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, but the weights are on {device}")
    if backend == "triton":
        ok, detail = _triton_status()
        if not ok:
            raise RuntimeError(f"backend 'triton' is unavailable: {detail}")
        if device is not None and device.type != "cuda" and not (device.type == "cpu" and
                                                                 _triton_interpret()):
            raise ValueError(f"backend 'triton' needs CUDA tensors (or CPU tensors under "
                             f"TRITON_INTERPRET=1), but the weights are on {device}")
        for i, w in enumerate(weights):   # other bad dtypes are left to the general checks
            if w.dtype == torch.float64:
                raise TypeError(f"backend 'triton' takes float32, float16 and bfloat16 weights; "
                                f"weights[{i}] is torch.float64 (use backend 'cpu' or "
                                "'reference')")
    return backend


def fused_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], *,
               lam: float = 0.01, n_iter: int = 1,
               grads: Optional[Sequence[torch.Tensor]] = None,
               backend: str = "auto") -> torch.Tensor:
    """One spectral-norm regularization step for all layers at once.

    For each weight W (matricized along dim 0) runs ``n_iter`` power iterations from its vector
    v (updated in place) and adds the gradient of lam/2 * sigma^2, ``lam * sigma * u v^T``, into
    its gradient: ``grads[l]`` if given, else ``W.grad`` (created if None).

    Returns sigma per layer, a float32 tensor of shape [L] (float64 if any weight is float64) on
    the weights' device.  No host synchronisation.  Bad input raises before anything is changed.
    """
    lam, n_iter = _checks.check_lam(lam), _checks.check_n_iter(n_iter)
    weights, vs = _checks.as_list("weights", weights), _checks.as_list("vs", vs)
    if distributed.any_dtensor(weights):     # sharded weights: the full matrices' norms
        _check_backend_name(backend)
        return distributed.fused_step(weights, vs, lam, n_iter, grads)
    name = resolve_backend(weights, backend)
    if name == "reference" or not weights:
        return reference.fused_step(weights, vs, lam=lam, n_iter=n_iter, grads=grads)
    if name == "triton":
        weights, vs, grads, lam, n_iter = _checks.check_fused_step_args(weights, vs, grads, lam,
                                                                        n_iter)
        grads = _checks.resolve_grads(weights, grads, vs)
        with torch.no_grad():
            return _ops.fused_step_triton(weights, vs, grads, lam, n_iter)
    # A native kernel checks every tensor itself (csrc/spectral_ext.h: same rules, same messages)
    # before it changes anything; a per-layer loop of Python checks would cost more than the
    # kernel on many small layers.  Only creating a missing .grad needs the checks first.
    if grads is None:
        grads = [w.grad for w in weights]
        if any(g is None for g in grads):
            _checks.check_fused_step_args(weights, vs, None, lam, n_iter)
            grads = _checks.resolve_grads(weights, None, vs)
    with torch.no_grad():
        return _ops.fused_step(weights, vs, _checks.as_list("grads", grads), lam, n_iter)


_LAUNCH_MODES = ("phases", "persistent")


def set_cuda_launch_mode(mode: str) -> None:
    """How the "cuda" backend runs a step, process-wide (``make gpu-check STAGES=bench`` times
    both; the results are bitwise the same):

    * ``"phases"`` (the default): a kernel per pass over the weights, ``2 * n_iter + 1`` per
      weight dtype (3 for ``n_iter=1``); the mode measured on a GPU (README, "Performance").
    * ``"persistent"``: one kernel per step, of as many blocks as fit on the GPU, taking the
      tiles of every pass in order and waiting only on their own layer's previous pass, so there
      is no launch between passes.  It saves two launches per step (for many small layers, where
      launches dominate) and lets the passes of different layers overlap; it has **not run on a
      GPU yet**, which is why it is not the default.

    A CUDA graph replays the kernels of the mode in effect when it was captured."""
    if mode not in _LAUNCH_MODES:
        raise ValueError(f"the CUDA launch mode is one of {_LAUNCH_MODES}, got {mode!r}")
    if _ops.CUDA_KERNELS_ERROR is not None:
        raise RuntimeError(f"no CUDA kernels to set the launch mode of: {_ops.CUDA_KERNELS_ERROR}")
    from . import _C
    _C.cuda_launch_mode(_LAUNCH_MODES.index(mode))


def cuda_launch_mode() -> str:
    """The "cuda" backend's launch mode (see :func:`set_cuda_launch_mode`)."""
    if _ops.CUDA_KERNELS_ERROR is not None:
        return "phases"
    from . import _C
    return _LAUNCH_MODES[_C.cuda_launch_mode()]


def make_step_plan(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], *,
                   backend: str = "auto"):
    """A persistent step plan for these weights and vectors, or None where there is none.

    ``plan.step(lam, n_iter)`` does what ``fused_step(weights, vs, lam=lam, n_iter=n_iter,
    backend=backend)`` does (the same checks and messages, ``.grad`` created where it is None,
    bitwise the same results) without passing any tensor: the plan holds the weights and
    vectors, reads each weight's ``.grad`` when it runs, and repeats the input checks only when
    a tensor's address, shape, strides, dtype or device changed (issue 14 item 1).  It returns
    None, doing nothing, when the weights are no longer on its backend's device or a weight does
    not require grad: then call ``fused_step``.  An eager fast path only: never call it under
    ``torch.compile`` (the regularizer uses the op there).  :func:`plan_step` is the same call
    without the custom-class method's overhead (3-4 us per call; what the regularizer uses).

    There are plans for the C++ backends, "cpu" and "cuda": None for the others ("reference",
    "triton"), for DTensor weights and where the kernels are not built.  Bad backend names or
    placements raise as in ``fused_step``.
    """
    weights, vs = _checks.as_list("weights", weights), _checks.as_list("vs", vs)
    if not weights or distributed.any_dtensor(weights):
        return None
    plan = {"cpu": _ops.CpuStepPlan, "cuda": _ops.CudaStepPlan}.get(
        resolve_backend(weights, backend))
    return None if plan is None else plan(weights, vs)


def plan_step(plan, lam: float, n_iter: int = 1) -> Optional[torch.Tensor]:
    """``plan.step(lam, n_iter)`` for a plan from :func:`make_step_plan`, called directly (one
    C function: about 1 us where the method costs 4-5 us before the step starts).  The same
    results, the same errors from the step (bad lam or n_iter values, bad tensors) and None
    (declined: call ``fused_step``).  Its own: a TypeError for anything but a plan, a lam
    without ``__float__`` or an n_iter without ``__index__``; a ValueError for an n_iter beyond
    64 bits."""
    if _ops.plan_step is None:
        raise RuntimeError(_ops.CPU_EXTENSION_ERROR)
    return _ops.plan_step(plan, lam, n_iter)


def spectral_norms(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], n_iter: int = 1,
                   *, backend: str = "auto", update: bool = True) -> torch.Tensor:
    """Differentiable sigma per layer ([L]), with dsigma_l/dW_l = u_l v_l^T.

    Runs ``n_iter`` power iterations from each v; with ``update=True`` (default) the new v are
    copied into ``vs`` so the next call warm-starts.  ``(lam / 2 * sigma**2).sum()`` added to a
    loss gives exactly the gradient that :func:`fused_step` adds.
    """
    if distributed.any_dtensor(_checks.as_list("weights", weights)):
        _check_backend_name(backend)
        return distributed.spectral_norms(list(weights), _checks.as_list("vs", vs),
                                          _checks.check_n_iter(n_iter), update=update)
    sigma, _, _ = spectral_norms_with_vectors(weights, vs, n_iter, backend=backend, update=update)
    return sigma


def spectral_norms_with_vectors(weights, vs, n_iter: int = 1, *, backend: str = "auto",
                                update: bool = True
                                ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Like :func:`spectral_norms`, also returning the final ``us`` and ``vs_new``."""
    if distributed.any_dtensor(_checks.as_list("weights", weights)):
        raise TypeError("spectral_norms_with_vectors takes plain tensors; for DTensor weights use "
                        "spectral_norms (u is sharded like the rows of each weight)")
    weights, vs = _checks.check_weights_and_vectors(weights, vs)
    n_iter = _checks.check_n_iter(n_iter)
    name = resolve_backend(weights, backend)
    if not weights:
        return torch.empty(0), [], []
    if name == "reference":
        sigma, us, vs_new = reference.spectral_norms(weights, vs, n_iter)
    elif name == "triton":
        sigma, us, vs_new = _ops.spectral_norms_triton(weights, [v.detach() for v in vs], n_iter)
    else:   # cpu, cuda: the op's kernel for the weights' device (and its fused backward on CUDA)
        sigma, us, vs_new = _ops.spectral_norms(weights, [v.detach() for v in vs], n_iter)
    if update:
        with torch.no_grad():
            torch._foreach_copy_(vs, vs_new)
    return sigma, us, vs_new
