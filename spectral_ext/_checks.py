"""Input checks shared by every backend (written once; the C++ side has its own copy in
``csrc/spectral_ext.h`` for callers that reach ``torch.ops.spectral_ext`` directly).

Every check here reads metadata only (shapes, dtypes, devices, identities): none of them
synchronises with the device, so they are safe on the training-step path and under
``torch.compile``.  They all run *before* anything is mutated, so a rejected call leaves every
tensor exactly as it was.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

#: weight dtypes every backend accepts
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: dtypes a persistent vector v may have
VECTOR_DTYPES = (torch.float32, torch.float64)


def acc_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for a weight dtype: float64 for float64 weights, else float32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def sigma_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    """dtype of the returned sigma vector: float64 if any weight is float64, else float32."""
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def matrix_shape(w: torch.Tensor) -> tuple:
    """(rows, cols) of the matricized weight: ``w.reshape(w.shape[0], -1)``."""
    rows = w.shape[0]
    return rows, (w.numel() // rows if rows else 0)


def as_list(name: str, xs) -> List[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
    return list(xs)


def check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a Python float, got {type(lam).__name__}")
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (it scales the penalty lam/2 * sigma^2), got {lam}")
    return lam


def check_coefficient(name: str, value) -> float:
    """A regularization weight (mu, lam of the related methods): a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_optional_positive(name: str, value):
    """A tolerance or step (tol, eps): None, or a number > 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")
    return value


def check_n_iter(n_iter) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int):
        raise TypeError(f"n_iter must be an int, got {type(n_iter).__name__}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    return n_iter


def check_weights_and_vectors(weights, vs, overlap: bool = True):
    """Checks weights and vectors; returns them as lists.  ``overlap=False`` leaves the memory
    overlap check to the caller (check_fused_step_args runs it once, with the gradients)."""
    weights = as_list("weights", weights)
    vs = as_list("vs", vs)
    if len(weights) != len(vs):
        raise ValueError(f"got {len(weights)} weights but {len(vs)} vectors (vs): one v per weight")
    device = weights[0].device if weights else None
    seen_v, seen_w = {}, {}
    for i, (w, v) in enumerate(zip(weights, vs)):
        if id(w) in seen_w:
            raise ValueError(f"weights[{i}] is the same tensor as weights[{seen_w[id(w)]}]; pass "
                             "each weight once (tied weights must be de-duplicated)")
        seen_w[id(w)] = i
        check_dense("weights", i, w, written=False)
        if w.dtype not in WEIGHT_DTYPES:
            raise TypeError(
                f"weights[{i}] has dtype {w.dtype}; supported weight dtypes are "
                "float32, float64, bfloat16 and float16")
        if w.dim() < 2:
            raise ValueError(
                f"weights[{i}] is {w.dim()}-D with shape {tuple(w.shape)}; the spectral norm "
                "needs a matrix (a weight with at least 2 dimensions, matricized along dim 0)")
        if w.numel() == 0:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)} with no elements")
        if w.device != device:
            raise ValueError(
                f"weights[{i}] is on {w.device} but weights[0] is on {device}: "
                "all tensors of one call must be on the same device")
        check_dense("vs", i, v, written=True)
        if v.dtype not in VECTOR_DTYPES:
            raise TypeError(f"vs[{i}] has dtype {v.dtype}; v must be float32 or float64")
        rows, cols = matrix_shape(w)
        if v.dim() != 1 or v.shape[0] != cols:
            raise ValueError(
                f"vs[{i}] has shape {tuple(v.shape)} but weights[{i}] of shape {tuple(w.shape)} "
                f"matricizes to {rows} x {cols}, so v must have shape ({cols},)")
        if v.device != device:
            raise ValueError(
                f"vs[{i}] is on {v.device} but weights[0] is on {device}: "
                "all tensors of one call must be on the same device")
        if _overlaps(v):
            raise ValueError(f"vs[{i}] has overlapping memory (an expanded tensor); it is "
                             "updated in place")
        if id(v) in seen_v:
            raise ValueError(f"vs[{i}] is the same tensor as vs[{seen_v[id(v)]}]: each layer "
                             "needs its own vector")
        seen_v[id(v)] = i
    if overlap:
        check_no_overlap(weights, vs)
    return weights, vs


def check_dense(name: str, i: int, t: torch.Tensor, written: bool) -> None:
    """The kernels read and write a tensor's memory directly: it must be dense (strided), and one
    that is written (a vector, a gradient) must carry no lazy negation bit (torch._neg_view; a
    negated weight is resolved by the caller).  Complex tensors fail the dtype rules."""
    if t.layout != torch.strided:
        raise ValueError(f"{name}[{i}] has layout {t.layout}; the spectral_ext ops need dense "
                         "(torch.strided) tensors")
    # (Dynamo cannot trace is_neg(); a compiled step's op still meets the dispatcher, whose
    # negation fallback refuses a negated tensor that is written)
    if written and not torch.compiler.is_compiling() and t.is_neg():
        raise ValueError(f"{name}[{i}] is a lazily negated view (is_neg() is True) and is updated "
                         "in place: pass t.resolve_neg()")


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (a stride of 0 on a dimension of size > 1): such a
    tensor cannot be updated in place element by element."""
    return any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))


def _check_grad(i: int, w: torch.Tensor, g: torch.Tensor) -> None:
    check_dense("grads", i, g, written=True)
    if g.shape != w.shape:
        raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but weights[{i}] has "
                         f"shape {tuple(w.shape)}")
    if g.dtype != w.dtype:
        raise TypeError(f"grads[{i}] has dtype {g.dtype} but weights[{i}] has dtype {w.dtype}")
    if g.device != w.device:
        raise ValueError(f"grads[{i}] is on {g.device} but weights[{i}] is on {w.device}")
    if _overlaps(g):
        raise ValueError(f"grads[{i}] has overlapping memory (an expanded tensor); it is "
                         "updated in place")


def check_grads(weights, grads) -> List[torch.Tensor]:
    grads = as_list("grads", grads)
    if len(grads) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(grads)} grads")
    seen = {}
    for i, (w, g) in enumerate(zip(weights, grads)):
        _check_grad(i, w, g)
        if id(g) in seen:
            raise ValueError(f"grads[{i}] is the same tensor as grads[{seen[id(g)]}]; pass each "
                             "weight once (tied weights must be de-duplicated)")
        seen[id(g)] = i
    return grads


def check_fused_step_args(weights, vs, grads, lam, n_iter):
    """All checks of a fused step. ``grads`` may be None (taken from ``.grad`` later)."""
    weights, vs = check_weights_and_vectors(weights, vs, overlap=grads is None)
    if grads is not None:
        grads = check_grads(weights, grads)
        check_no_overlap(weights, vs, grads)
    return weights, vs, grads, check_lam(lam), check_n_iter(n_iter)


def resolve_grads(weights: List[torch.Tensor],
                  grads: Optional[Sequence[torch.Tensor]],
                  vs: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The gradient tensors to add into: ``grads`` if given, else each weight's ``.grad``, which
    is created (zeros) where it is None.  Call only after every check has passed; with ``vs``,
    the existing ``.grad`` tensors are also checked for memory overlap first."""
    if grads is not None:
        return list(grads)
    for i, w in enumerate(weights):
        if not w.is_leaf:
            raise ValueError(f"weights[{i}] is not a leaf tensor, so it has no .grad to add into; "
                             "pass grads=... explicitly")
    # check the .grad tensors that exist before creating any, so a failure mutates nothing
    for i, w in enumerate(weights):
        if w.grad is not None:
            _check_grad(i, w, w.grad)
    if vs is not None:
        check_no_overlap(weights, vs, [w.grad for w in weights])
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
    return [w.grad for w in weights]


# ---- memory overlap (issue 13 item 12) ----------------------------------------------------------

_KINDS = ("weights", "vs", "grads")


def _byte_span(t: torch.Tensor):
    """(storage, first byte, one past the last byte) of t's elements within its storage, or None
    when t is empty or its sizes are symbolic (torch.compile with dynamic shapes: the eager call
    and the kernel check those).  Storage identity works for fake tensors too (the fake kernels
    under torch.compile), which have no addresses."""
    if t._has_symbolic_sizes_strides:
        return None
    item = t.element_size()
    start = t.storage_offset() * item
    if t.is_contiguous():
        if t.nbytes == 0:
            return None
        return t.untyped_storage()._cdata, start, start + t.nbytes
    shape = t.shape
    if 0 in shape:
        return None
    lo = hi = 0
    for size, stride in zip(shape, t.stride()):
        ext = (size - 1) * stride
        if ext < 0:
            lo += ext
        else:
            hi += ext
    return t.untyped_storage()._cdata, start + lo * item, start + (hi + 1) * item


def check_no_overlap(weights, vs, grads=None) -> None:
    """Every v and every gradient of a call needs memory of its own: none may overlap any other
    tensor of the call (a gradient that is its weight would change the weight mid-step; a v
    inside its weight or gradient gives answers that depend on the order of the writes; two
    overlapping gradients lose updates on a GPU).  Weights may share memory with each other: they
    are only read.  Byte ranges are compared (interleaved views of one buffer count as
    overlapping) within each storage; metadata only.  The same rule as csrc/spectral_ext.h."""
    if torch.compiler.is_dynamo_compiling():
        return   # Dynamo cannot trace storages; the op's fake kernel and kernel check instead
    by_storage = {}
    for kind, ts in enumerate((weights, vs, grads or ())):
        for i, t in enumerate(ts):
            span = None if t is None else _byte_span(t)
            if span is not None:
                entry = (span[1], kind, i, span[2])
                same = by_storage.get(span[0])
                if same is None:
                    by_storage[span[0]] = [entry]
                else:
                    same.append(entry)
    for spans in by_storage.values():
        if len(spans) > 1:
            _sweep(sorted(spans))


def _sweep(spans) -> None:
    """spans: (start, kind, index, end) of one storage, sorted; raises on an overlap that
    involves a written tensor (kind 1 or 2)."""
    far_any = far_written = None   # the span reaching furthest so far (all, and written ones)
    for s in spans:
        other = far_any if s[1] != 0 else far_written
        if other is not None and s[0] < other[3]:
            a, b = sorted((other, s), key=lambda x: (x[1], x[2]))
            raise ValueError(f"{_KINDS[a[1]]}[{a[2]}] and {_KINDS[b[1]]}[{b[2]}] overlap in "
                             "memory; every v and every gradient of a call needs memory of its "
                             "own (they are written by the step)")
        if far_any is None or s[3] > far_any[3]:
            far_any = s
        if s[1] != 0 and (far_written is None or s[3] > far_written[3]):
            far_written = s
