"""DTensor weights (FSDP2, tensor parallel, HSDP): the spectral norm of the *full* matrix,
computed on the shards.

Every rank holds a block of each matricized weight W (rows x cols, ``W.reshape(W.shape[0], -1)``
of the global tensor): ``Shard(0)`` on a mesh dim splits the rows, ``Shard(1)`` splits the
columns (for a conv weight out x in x kh x kw, a split of ``in`` is a contiguous block of the
in*kh*kw columns), ``Replicate`` splits nothing.  The vectors v are replicated: the full length
``cols`` on every rank, identical everywhere.  One power iteration of the full matrix is then

    u_raw = W v              local rows: sum of W_block v_block over the mesh dims sharding columns
    ||u_raw||^2              sum of the local squares over the mesh dims sharding rows
    u = u_raw / ||u_raw||
    v' = W^T u               local columns: sum of W_block^T u_block over the mesh dims sharding rows
    sigma = ||v'||, v = v'/sigma
                             the full v' by a sum of zero-padded blocks over the mesh dims
                             sharding columns (each rank fills its own columns)

and the gradient ``lam * sigma * u v^T`` is added to each rank's block of the (equally sharded)
gradient: rows of u and columns of v that the block covers, no communication.  Each of these sums
is ONE all-reduce of a flat buffer holding the partials of every layer that shares the same
placements, per mesh dim it runs over: for FSDP2 (``Shard(0)`` on a 1-D mesh) that is two
all-reduces per iteration, of L float64 norms and of sum(cols) floats, whatever the number of
layers L.  ``Partial`` placements, shards on dims other than 0 and 1 (which the matricization
interleaves) and FSDP2+TP's strided shards are refused with an error naming the weight.

Arithmetic follows spectral_ext.reference: the accumulation dtype (float32, float64 for float64
weights), squared norms summed in float64, divisions by a norm in float64 rounded once, the
zero-matrix and non-finite rules, and a v that no iteration updated kept bit for bit in its own
dtype.  One deliberate difference: the reference scales a float64 vector by a power of two before
its norm, so float64 entries beyond 1e154 (or below 1e-154) keep a finite norm; here the squares
are summed unscaled (scaling the same way on every rank would need one more all-reduce, of the
largest exponent, per reduction), so such float64 weights give an infinite (or zero) norm.  The
local products are plain PyTorch ops per layer (a fused local kernel for the partials is future
work); the collectives are torch.distributed's, on the weights' device mesh (gloo on CPU, NCCL on
GPUs).  No host synchronisation.  Eager only: torch.compile does not trace this path.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _checks, reference

try:  # torch.distributed is optional (some builds lack it)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None

__all__ = ["is_dtensor", "any_dtensor", "fused_step", "spectral_norms"]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[torch.Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


class _Layer:
    """One DTensor weight's block: local matrix, the mesh dims that shard its rows and its
    columns, and which columns of the full matrix it covers."""

    def __init__(self, i: int, w, mesh):
        if not isinstance(w, DTensor):
            raise TypeError(f"weights[{i}] is a plain tensor but other weights are DTensors: "
                            "pass all weights of one call as DTensors on one device mesh, or "
                            "all as plain tensors")
        if w.device_mesh != mesh:
            raise ValueError(f"weights[{i}] is on device mesh {w.device_mesh} but weights[0] is "
                             f"on {mesh}: all DTensor weights of one call must share one mesh")
        self.rows, self.cols = _checks.matrix_shape(w)
        self.row_dims: List[int] = []
        self.col_dims: List[int] = []
        for d, p in enumerate(w.placements):
            if isinstance(p, Replicate):
                continue
            if type(p) is not Shard:    # Partial, _StridedShard (FSDP2 + TP), ...
                raise ValueError(
                    f"weights[{i}] has placement {type(p).__name__} ({p}) on mesh dim {d}: "
                    "only Shard(0), Shard(1) "
                    "and Replicate are supported (redistribute it, e.g. to Replicate, first)")
            dim = p.dim if p.dim >= 0 else p.dim + w.dim()
            if dim == 0:
                self.row_dims.append(d)
            elif dim == 1:
                self.col_dims.append(d)
            else:
                raise ValueError(
                    f"weights[{i}] is sharded on tensor dim {dim} ({p} on mesh dim {d}): the "
                    "matricization rows x cols = shape[0] x prod(shape[1:]) keeps only shards of "
                    "dims 0 and 1 contiguous; shard it on dim 0 or 1")
        local = w.to_local()
        self.acc = _checks.acc_dtype(w.dtype)
        # layers that share a key share each flat buffer (its dtype is the accumulation dtype)
        self.key = (tuple(self.row_dims), tuple(self.col_dims), str(self.acc))
        self.W = local.reshape(local.shape[0], -1) if local.numel() else \
            local.new_zeros((local.shape[0], _numel(local.shape[1:])))
        if self.col_dims:
            _, offset = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
            inner = _numel(w.shape[2:])
            self.c0 = offset[1] * inner
        else:
            self.c0 = 0
        self.c1 = self.c0 + self.W.shape[1]


def _numel(shape) -> int:
    return math.prod(shape) if len(shape) else 1


#: what this process has handed to all_reduce (calls, bytes) since the last reset: the example
#: and the docs report the traffic of a step from it
traffic = {"calls": 0, "bytes": 0}


def reset_traffic() -> None:
    traffic.update(calls=0, bytes=0)


def _allreduce(bufs: List[torch.Tensor], mesh, dims: Sequence[int]) -> List[torch.Tensor]:
    """Sum the tensors over the given mesh dims: one all-reduce of one flat buffer per dim."""
    if not dims or not bufs:
        return bufs
    flat = torch.cat([b.reshape(-1) for b in bufs])
    for d in dims:
        dist.all_reduce(flat, group=mesh.get_group(d))
        traffic["calls"] += 1
        traffic["bytes"] += flat.numel() * flat.element_size()
    out, k = [], 0
    for b in bufs:
        out.append(flat[k:k + b.numel()].view_as(b))
        k += b.numel()
    return out


def _norm64(x: torch.Tensor) -> torch.Tensor:
    return x.double().square().sum()


def _iterate(layers: List[_Layer], vs: List[torch.Tensor], n_iter: int, mesh):
    """n_iter power iterations of every layer; returns (sigma, u_local, v, v_new) per layer, like
    reference._power_iteration of the full matrix (u restricted to the local rows)."""
    groups: Dict[Tuple, List[int]] = {}
    for i, L in enumerate(layers):
        groups.setdefault(L.key, []).append(i)
    v = [vs[i].detach().to(L.acc) for i, L in enumerate(layers)]
    sig = [None] * len(layers)
    u = [None] * len(layers)
    updated = [torch.zeros((), dtype=torch.bool, device=x.device) for x in v]
    for _ in range(n_iter):
        u_raw = [torch.mv(L.W.to(L.acc), v[i][L.c0:L.c1]) for i, L in enumerate(layers)]
        for (row_dims, col_dims, _), idx in groups.items():
            red = _allreduce([u_raw[i] for i in idx], mesh, col_dims)
            for i, r in zip(idx, red):
                u_raw[i] = r
        n2 = [_norm64(x).reshape(1) for x in u_raw]
        for (row_dims, col_dims, _), idx in groups.items():
            red = _allreduce([n2[i] for i in idx], mesh, row_dims)
            for i, r in zip(idx, red):
                n2[i] = r
        vp = []
        for i, L in enumerate(layers):
            u[i] = reference._divide(u_raw[i], n2[i].sqrt().reshape(()))
            vp.append(torch.mv(L.W.to(L.acc).t(), u[i]))
        for (row_dims, col_dims, _), idx in groups.items():
            red = _allreduce([vp[i] for i in idx], mesh, row_dims)
            if col_dims:   # the full v': each rank's columns in a zero-padded full-length buffer
                full = []
                for i, r in zip(idx, red):
                    f = r.new_zeros(layers[i].cols)
                    f[layers[i].c0:layers[i].c1] = r
                    full.append(f)
                red = _allreduce(full, mesh, col_dims)
            for i, r in zip(idx, red):
                vp[i] = r
        for i, L in enumerate(layers):
            s64 = _norm64(vp[i]).sqrt()
            s = s64.to(L.acc)
            ok = (s > 0) & torch.isfinite(s)
            v[i] = torch.where(ok, reference._divide(vp[i], s64), v[i])
            updated[i] = updated[i] | ok
            sig[i] = s
    # v in the accumulation dtype (for the gradient), and the new v to store: in each old v's
    # dtype, or the old v bit for bit where no iteration updated it
    return sig, u, v, [reference._new_v(vs[i], v[i], updated[i]) for i in range(len(layers))]


def _check(weights, vs, grads, step: bool):
    weights, vs = _checks.check_weights_and_vectors(weights, vs, overlap=False)
    mesh = weights[0].device_mesh if isinstance(weights[0], DTensor) else None
    layers = [_Layer(i, w, mesh) for i, w in enumerate(weights)]
    for i, v in enumerate(vs):
        if isinstance(v, DTensor):
            raise TypeError(f"vs[{i}] is a DTensor: the vectors are replicated plain tensors (the "
                            "full length cols on every rank, identical everywhere)")
    if grads is not None:
        grads = _checks.check_grads(weights, grads)
    # the gradients the step adds into (explicit, or the existing .grad; a missing .grad is
    # created like its weight) must be sharded like their weights
    for i, (w, g) in enumerate(zip(weights, grads if grads is not None
                                   else [w.grad for w in weights] if step else [])):
        if g is None:
            continue
        if not isinstance(g, DTensor) or g.device_mesh != w.device_mesh or \
                tuple(g.placements) != tuple(w.placements):
            what = f"grads[{i}]" if grads is not None else f"weights[{i}].grad"
            raise ValueError(f"{what} must be a DTensor with the placements of "
                             f"weights[{i}] ({tuple(w.placements)}), got "
                             f"{tuple(g.placements) if isinstance(g, DTensor) else 'a plain tensor'}")
    # the memory rule of every backend, on this rank's shards (the explicit grads, or the
    # existing .grad tensors, which the step writes; none is created before this check)
    gs = grads if grads is not None else [w.grad for w in weights] if step else []
    _checks.check_no_overlap([_local(w) for w in weights], vs,
                             [None if g is None else _local(g) for g in gs])
    return weights, vs, grads, layers, mesh


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check(weights, vs, grads=None, step: bool = True) -> None:
    """Every check of fused_step (step=True) or spectral_norms (step=False) for DTensor weights,
    without computing anything (the regularizer checks each group of a step before it runs
    any)."""
    _check(weights, vs, grads, step)


def fused_step(weights, vs, lam: float, n_iter: int, grads=None) -> torch.Tensor:
    """spectral_ext.fused_step for DTensor weights (see the module docstring)."""
    weights, vs, grads, layers, mesh = _check(weights, vs, grads, step=True)
    grads = _checks.resolve_grads(weights, grads)
    sdtype = _checks.sigma_dtype(weights)
    with torch.no_grad():
        sig, u, va, vn = _iterate(layers, vs, n_iter, mesh)
        for L, g, v, s, ui, vi, vnew in zip(layers, grads, vs, sig, u, va, vn):
            gl = g.to_local()
            if gl.numel():
                upd = lam * s * torch.outer(ui, vi[L.c0:L.c1])
                gl.add_(upd.reshape(gl.shape))
            v.copy_(vnew)
        return torch.stack([s.to(sdtype) for s in sig])


class _ShardedNorms(torch.autograd.Function):
    """The sigmas, computed already; dsigma_l/dW_l = u_l v_l^T on each rank's block of W_l (u, v
    the final estimates, held constant: the paper's gradient, as in reference.spectral_norms)."""

    @staticmethod
    def forward(ctx, sigma, layers, u, vn, *weights):
        ctx.layers, ctx.u, ctx.vn = layers, u, vn
        ctx.meta = [(w.device_mesh, w.placements, w.shape, w.stride(), w.dtype) for w in weights]
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad_sigma):
        out = []
        for k, (L, ui, vi, (mesh, placements, shape, stride, dtype)) in enumerate(
                zip(ctx.layers, ctx.u, ctx.vn, ctx.meta)):
            local = grad_sigma[k].to(ui.dtype) * torch.outer(ui, vi[L.c0:L.c1])
            local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
            out.append(DTensor.from_local(local.reshape(local_shape).to(dtype), mesh, placements,
                                          run_check=False, shape=shape, stride=stride))
        return (None, None, None, None, *out)


def spectral_norms(weights, vs, n_iter: int, update: bool = True) -> torch.Tensor:
    """spectral_ext.spectral_norms for DTensor weights: sigma [L], replicated on every rank,
    differentiable (each rank's block of dsigma/dW = u v^T); with update=True the new v are
    copied into vs."""
    weights, vs, _, layers, mesh = _check(weights, vs, None, step=False)
    sdtype = _checks.sigma_dtype(weights)
    with torch.no_grad():
        sig, u, va, vn = _iterate(layers, vs, n_iter, mesh)
        sigma = torch.stack([s.to(sdtype) for s in sig])
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        sigma = _ShardedNorms.apply(sigma, layers, u, va, *weights)
    if update:
        with torch.no_grad():
            for v, vi in zip(vs, vn):
                v.copy_(vi)
    return sigma
