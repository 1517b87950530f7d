"""The spectral norm of a convolution as a linear map on its input (issue 15).

The paper (and ``conv_norm="matricized"``) regularizes a conv weight out x in x kh x kw as the
out x in*kh*kw matrix.  That is not the norm of the convolution x -> conv(x): it ignores the
stride, the padding, the dilation and how kernel positions overlap, and the two can differ by a
factor of up to about sqrt(kh*kw).  This module computes the norm of the map itself, on inputs of
a given size (C, *spatial):

* :func:`conv_operator_norm`: sigma of ``module`` (Conv1d/2d/3d, ConvTranspose1d/2d/3d, with
  their stride, padding and ``padding_mode``, dilation, groups) by power iteration through the
  conv and its adjoint, or Lanczos, or (for circular padding at stride 1, where the map is a
  circular convolution) exactly by FFT (Sedghi, Gupta & Long 2019: the singular values are those
  of the per-frequency out x in matrices of the kernel's DFT).
* ``SpectralNormRegularizer(model, conv_norm="operator")`` (regularizer.py calls
  :class:`OperatorMode`): one input-shaped vector per conv, one power iteration per step, and
  lam*sigma*dsigma/dW added into the weight's gradient; small convs of the same geometry are
  batched into one grouped conv call per iteration (``BATCH_MAX_NUMEL``).
* :func:`conv_norm_report`: per conv layer, the matricized sigma against the operator sigma.

The operator A and its adjoint.  A Conv is ``conv(pad(x))``, where ``pad`` is the module's own
padding (zeros, reflect, replicate or circular; the zero padding of a numeric ``padding`` is
left to the conv call).  Its adjoint is ``pad^T(conv_transpose(u))``: conv_transpose with the
output padding that gives back the padded input's size, then ``pad^T``, which for reflect /
replicate / circular padding adds each padded entry back onto the input entry it was copied
from (a plain conv_transpose would drop those contributions; written with slices, so it is
deterministic).  A ConvTranspose is ``conv_transpose(x)`` with the module's ``output_padding``;
its adjoint is ``conv(u)`` cropped to the input's size.  The weight gradient of <u, A_W x>
is ``aten.convolution_backward``'s weight output: no graph, no extra forward.

One power iteration, as for the matrices (reference.py): u = normalize(A v), v' = A^T u,
sigma = ||v'||, v = v' / sigma; the gradient of lam/2*sigma^2 with u and v held fixed is
lam * sigma * d<u, A_W v>/dW.  A zero weight gives sigma = 0, adds nothing and keeps v; NaN/Inf
weights give a non-finite sigma and gradient and keep v.  Arithmetic is float32 for
float32/bfloat16/float16 weights and float64 for float64 weights; norms are summed in float64.
With ``tol=None`` nothing here synchronizes with the device.
"""

from __future__ import annotations

import math
import sys
import weakref
import zlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, _power

__all__ = ["conv_operator_norm", "ConvNorm", "ConvGeometry", "geometry", "fft_norm",
           "record_input_sizes", "conv_norm_report", "CONV_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
METHODS = ("auto", "power", "lanczos", "fft")


# ---- geometry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvGeometry:
    """Everything the linear map x -> conv(x) depends on besides the weight's values (hashable:
    convs with equal geometries are batched together)."""
    transposed: bool
    in_size: Tuple[int, ...]           # (C_in, *spatial) of the module's input
    out_size: Tuple[int, ...]          # (C_out, *spatial) of its output
    weight_shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    padding: Tuple[int, ...]           # the symmetric zero padding the conv call applies
    output_padding: Tuple[int, ...]    # ConvTranspose: the module's; Conv: its adjoint's
    pad: Optional[Tuple[int, ...]]     # explicit padding in F.pad order (last dim first), or None
    pad_mode: str                      # F.pad's mode for ``pad``: constant/reflect/replicate/circular

    @property
    def nd(self) -> int:
        return len(self.in_size) - 1

    @property
    def fft_exact(self) -> bool:
        """Whether the map is a circular convolution (circular padding, stride 1, output the size
        of the input), so :func:`fft_norm` gives its norm exactly."""
        return (not self.transposed and self.pad_mode == "circular" and
                all(s == 1 for s in self.stride) and self.out_size[1:] == self.in_size[1:])

    def lr(self, i: int) -> Tuple[int, int]:
        """(left, right) explicit padding of spatial dim i."""
        j = 2 * (self.nd - 1 - i)
        return self.pad[j], self.pad[j + 1]

    def describe(self) -> str:
        kind = "ConvTranspose" if self.transposed else "Conv"
        k = self.weight_shape[2:]
        pad = (f"pad {self.pad_mode} {list(self.pad)}" if self.pad is not None
               else f"padding {list(self.padding)}")
        return (f"{kind}{self.nd}d {self.in_size[0]}->{self.out_size[0]} k{list(k)} "
                f"s{list(self.stride)} d{list(self.dilation)} g{self.groups} {pad} on "
                f"{list(self.in_size[1:])}")


def _as_size(input_size, nd: int, what: str) -> Tuple[int, ...]:
    if isinstance(input_size, torch.Tensor) or not isinstance(input_size, (tuple, list, torch.Size)):
        raise TypeError(f"{what}: input_size must be a tuple (channels, *spatial sizes), got "
                        f"{type(input_size).__name__}")
    for s in input_size:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{what}: input_size must hold ints, got {tuple(input_size)!r}")
    if len(input_size) != nd + 1:
        raise ValueError(f"{what}: input_size must be (channels, {nd} spatial size"
                         f"{'s' if nd > 1 else ''}) without the batch dimension, got "
                         f"{tuple(input_size)}")
    if any(s < 1 for s in input_size):
        raise ValueError(f"{what}: input_size must be positive, got {tuple(input_size)}")
    return tuple(int(s) for s in input_size)


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight (a parametrized one computed), refusing a lazy module not yet run."""
    w = module.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(module).__name__} has an uninitialized (lazy) weight: run one "
                         "forward pass first")
    return w


def geometry(module: nn.Module, input_size, what: str = "module",
             weight_shape: Optional[Tuple[int, ...]] = None) -> ConvGeometry:
    """The geometry of ``module`` on inputs of size ``input_size`` = (C, *spatial); raises a
    ValueError/TypeError naming ``what`` and the problem if the conv cannot take that input."""
    if not isinstance(module, CONV_TYPES):
        raise TypeError(f"{what} must be an nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d, got "
                        f"{type(module).__name__}")
    if weight_shape is None:
        weight_shape = tuple(_weight_of(module).shape)
    nd = len(module.kernel_size)
    size = _as_size(input_size, nd, what)
    if size[0] != module.in_channels:
        raise ValueError(f"{what} ({type(module).__name__}) takes {module.in_channels} input "
                         f"channels, but input_size {size} has {size[0]}")
    n = size[1:]
    k, s, d = module.kernel_size, module.stride, module.dilation
    ext = [d[i] * (k[i] - 1) + 1 for i in range(nd)]
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if transposed:
        p, op = tuple(module.padding), tuple(module.output_padding)
        out = [(n[i] - 1) * s[i] - 2 * p[i] + ext[i] + op[i] for i in range(nd)]
        for i in range(nd):
            if out[i] < 1:
                raise ValueError(f"{what} ({type(module).__name__}) cannot take input_size {size}: "
                                 f"its output would have size {out[i]} along spatial dim {i}")
            if not (op[i] < s[i] or op[i] < d[i]):
                raise ValueError(f"{what}: output_padding {op} must be smaller than the stride "
                                 "or the dilation")
        return ConvGeometry(True, size, (module.out_channels, *out), weight_shape, tuple(s),
                            tuple(d), module.groups, p, op, None, "constant")
    rp = tuple(module._reversed_padding_repeated_twice)     # F.pad order, as _conv_forward uses
    lefts = [rp[2 * (nd - 1 - i)] for i in range(nd)]
    rights = [rp[2 * (nd - 1 - i) + 1] for i in range(nd)]
    mode = module.padding_mode
    if mode == "zeros" and lefts == rights:                 # left to the conv call
        conv_pad, pad, pad_mode = tuple(lefts), None, "constant"
    else:                                                   # 'same' with an even extent, or a mode
        conv_pad, pad, pad_mode = (0,) * nd, rp, ("constant" if mode == "zeros" else mode)
        for i in range(nd):
            big = max(lefts[i], rights[i])
            if mode == "reflect" and big >= n[i]:
                raise ValueError(f"{what}: reflect padding {big} needs an input larger than "
                                 f"{big} along spatial dim {i}, but input_size {size} has {n[i]}")
            if mode == "circular" and big > n[i]:
                raise ValueError(f"{what}: circular padding {big} needs an input of at least "
                                 f"{big} along spatial dim {i}, but input_size {size} has {n[i]}")
    padded = [n[i] + lefts[i] + rights[i] for i in range(nd)]
    out = []
    for i in range(nd):
        if padded[i] < ext[i]:
            raise ValueError(f"{what} ({type(module).__name__}) cannot take input_size {size}: "
                             f"the kernel spans {ext[i]} along spatial dim {i} but the padded "
                             f"input is only {padded[i]}")
        out.append((padded[i] - ext[i]) // s[i] + 1)
    # the adjoint's conv_transpose gives back the padded size: the rows the stride skipped
    adj_op = tuple(padded[i] - ((out[i] - 1) * s[i] + ext[i]) for i in range(nd))
    return ConvGeometry(False, size, (module.out_channels, *out), weight_shape, tuple(s), tuple(d),
                        module.groups, conv_pad, adj_op, pad, pad_mode)


# ---- the operator, its adjoint and its weight gradient (L layers stacked as groups) -----------

def apply(geom: ConvGeometry, x: torch.Tensor, w: torch.Tensor, L: int = 1) -> torch.Tensor:
    """A x for x of shape (B, L*C_in, *spatial) and w the L weights concatenated along dim 0
    (one grouped conv call); returns (B, L*C_out, *out spatial)."""
    g = geom.groups * L
    if geom.transposed:
        return _CONV_T[geom.nd](x, w, None, geom.stride, geom.padding, geom.output_padding, g,
                                geom.dilation)
    if geom.pad is not None:
        x = F.pad(x, geom.pad, mode=geom.pad_mode)
    return _CONV[geom.nd](x, w, None, geom.stride, geom.padding, geom.dilation, g)


def adjoint(geom: ConvGeometry, y: torch.Tensor, w: torch.Tensor, L: int = 1) -> torch.Tensor:
    """A^T y: the exact adjoint of :func:`apply` (every padding mode)."""
    g = geom.groups * L
    if geom.transposed:
        x = _CONV[geom.nd](y, w, None, geom.stride, geom.padding, geom.dilation, g)
        for i in range(geom.nd):          # an output_padding >= stride gives extra rows: crop
            if x.shape[2 + i] != geom.in_size[1 + i]:
                x = x.narrow(2 + i, 0, geom.in_size[1 + i])
        return x
    x = _CONV_T[geom.nd](y, w, None, geom.stride, geom.padding, geom.output_padding, g,
                         geom.dilation)
    return _unpad(geom, x) if geom.pad is not None else x


def _unpad(geom: ConvGeometry, x: torch.Tensor) -> torch.Tensor:
    """pad^T: the adjoint of F.pad(., geom.pad, geom.pad_mode), one spatial dim at a time (the
    multi-dimensional pad is the product of the one-dimensional ones)."""
    for i in range(geom.nd):
        dim, n = 2 + i, geom.in_size[1 + i]
        left, right = geom.lr(i)
        if left == 0 and right == 0:
            continue
        core = x.narrow(dim, left, n)
        if geom.pad_mode == "constant":
            x = core
            continue
        lo, hi = x.narrow(dim, 0, left), x.narrow(dim, left + n, right)
        out = core.clone()
        if geom.pad_mode == "circular":        # pad[j] = x[(j - left) mod n]
            if left:
                out.narrow(dim, n - left, left).add_(lo)
            if right:
                out.narrow(dim, 0, right).add_(hi)
        elif geom.pad_mode == "reflect":       # left pad = x[left], ..., x[1]; right = x[n-2], ...
            if left:
                out.narrow(dim, 1, left).add_(lo.flip(dim))
            if right:
                out.narrow(dim, n - 1 - right, right).add_(hi.flip(dim))
        else:                                  # replicate: copies of x[0] and x[n-1]
            if left:
                out.narrow(dim, 0, 1).add_(lo.sum(dim, keepdim=True))
            if right:
                out.narrow(dim, n - 1, 1).add_(hi.sum(dim, keepdim=True))
        x = out
    return x


def weight_grad(geom: ConvGeometry, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                L: int = 1) -> torch.Tensor:
    """d<u, A_w x>/dw (the conv's own weight gradient for input x and output gradient u)."""
    g = geom.groups * L
    mask = [False, True, False]
    if geom.transposed:
        return torch.ops.aten.convolution_backward(
            u, x, w, None, geom.stride, geom.padding, geom.dilation, True, geom.output_padding,
            g, mask)[1]
    if geom.pad is not None:
        x = F.pad(x, geom.pad, mode=geom.pad_mode)
    return torch.ops.aten.convolution_backward(
        u, x, w, None, geom.stride, geom.padding, geom.dilation, False, [0] * geom.nd, g,
        mask)[1]


def _layer_norms(t: torch.Tensor, L: int) -> torch.Tensor:
    # squared norms summed in float64 (as reference.py), per layer of the stack
    return torch.linalg.vector_norm(t.reshape(L, -1), dim=1, dtype=torch.float64).to(t.dtype)


def _per_layer(t: torch.Tensor, s: torch.Tensor, L: int) -> torch.Tensor:
    return (t.reshape(L, -1) * s.reshape(L, 1)).reshape(t.shape)


def power_iterations(geom: ConvGeometry, w: torch.Tensor, v: torch.Tensor, L: int, n_iter: int):
    """``n_iter`` power iterations for L stacked layers: v is (1, L*C_in, *spatial), unit per
    layer.  Returns (sigma [L], u, v_new), as reference.power_iteration does for a matrix."""
    sigma = u = None
    for _ in range(n_iter):
        y = apply(geom, v, w, L)
        nrm = _layer_norms(y, L)
        u = _per_layer(y, torch.where(nrm == 0, 0.0, 1.0 / nrm), L)
        vp = adjoint(geom, u, w, L)
        sigma = _layer_norms(vp, L)
        ok = ((sigma > 0) & torch.isfinite(sigma)).reshape(L, 1)
        v = torch.where(ok, vp.reshape(L, -1) / sigma.reshape(L, 1),
                        v.reshape(L, -1)).reshape(vp.shape)
    return sigma, u, v


def fft_norm(geom: ConvGeometry, w: torch.Tensor) -> torch.Tensor:
    """The exact norm of a circular convolution (``geom.fft_exact``), differentiable in w.

    y[o] = sum_j K[j] x[(o + j*d - left) mod n] is a circular convolution with the kernel K
    placed at positions j*d mod n, so in the Fourier basis it is block diagonal: one
    C_out/g x C_in/g matrix per frequency and group (Sedghi, Gupta & Long 2019); the shift by
    ``left`` and the sign of the frequency change only phases, not the singular values.  A real
    kernel's blocks at w and -w are conjugate, so rfftn's half of the spectrum suffices."""
    if not geom.fft_exact:
        raise ValueError("the FFT norm is exact only for padding_mode='circular' at stride 1 with "
                         f"an output the size of the input; this conv is {geom.describe()}")
    k = w.to(_checks.acc_dtype(w.dtype))
    n = geom.in_size[1:]
    for i in range(geom.nd):
        dim = 2 + i
        idx = (torch.arange(k.shape[dim], device=k.device) * geom.dilation[i]) % n[i]
        shape = list(k.shape)
        shape[dim] = n[i]
        k = k.new_zeros(shape).index_add(dim, idx, k)
    spec = torch.fft.rfftn(k, dim=tuple(range(2, 2 + geom.nd)))
    co, cig, g = w.shape[0], w.shape[1], geom.groups
    blocks = spec.reshape(g, co // g, cig, -1).permute(3, 0, 1, 2)
    return torch.linalg.matrix_norm(blocks, ord=2).amax()


# ---- the stand-alone norm ----------------------------------------------------------------------

class ConvNorm(NamedTuple):
    sigma: torch.Tensor          # 0-d; differentiable in module.weight where grad is enabled
    v: Optional[torch.Tensor]    # the unit input-shaped vector (warm start); None for "fft"
    iterations: int              # operator applications (A and A^T) made
    method: str                  # "power", "lanczos" or "fft"


def conv_operator_norm(module: nn.Module, input_size, n_iter: int = 100,
                       tol: Optional[float] = None, *, v0: Optional[torch.Tensor] = None,
                       method: str = "auto", check_every: int = 5) -> ConvNorm:
    """The spectral norm of x -> module(x) - bias on inputs of size ``input_size`` = (C, *spatial).

    ``method``: "power" (``n_iter`` power iterations from ``v0``, or a random vector drawn from
    torch's global generator; with ``tol``, stop when sigma changed by at most ``tol``
    (relative) over ``check_every`` iterations: one host sync per check), "lanczos" (Lanczos on
    A^T A with full reorthogonalization: far fewer iterations where singular values cluster;
    keeps n_iter input-sized vectors), "fft" (exact, circular padding at stride 1 only) or
    "auto" (fft where it is exact, else power).  The power and Lanczos estimates approach sigma
    from below.  Returns (sigma, v, iterations, method); pass ``v0=result.v`` to warm-start.
    sigma is differentiable in the weight (d sigma/dW of <u, A_W v> with u, v held fixed).
    """
    geom = geometry(module, input_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    n_iter = _checks.check_n_iter(n_iter)
    _checks.check_optional_positive("tol", tol)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    w = _weight_of(module)
    if w.dtype not in _checks.WEIGHT_DTYPES:
        raise TypeError(f"the conv's weight has dtype {w.dtype}; supported are float32, float64, "
                        "bfloat16 and float16")
    if method == "auto":
        method = "fft" if geom.fft_exact else "power"
    if method == "fft":
        return ConvNorm(fft_norm(geom, w), None, 0, "fft")
    acc = _checks.acc_dtype(w.dtype)
    if v0 is None:
        v = torch.randn(geom.in_size, device=w.device, dtype=acc)
    else:
        if not isinstance(v0, torch.Tensor) or tuple(v0.shape) != geom.in_size:
            raise ValueError(f"v0 must be a tensor of the input size {geom.in_size}, got "
                             f"{tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        v = v0.detach().to(device=w.device, dtype=acc)
    wd = w.detach().to(acc)
    with torch.no_grad():
        v = v.unsqueeze(0)
        v = v / _layer_norms(v, 1)[0]
        if method == "power":
            it, prev = 0, None
            while it < n_iter:
                k = n_iter - it if tol is None else min(check_every, n_iter - it)
                sigma, u, v = power_iterations(geom, wd, v, 1, k)
                it += k
                if tol is not None and prev is not None and _power._converged(sigma, prev, tol):
                    break
                prev = sigma
        else:
            _, v, it = lanczos(lambda q: adjoint(geom, apply(geom, q, wd), wd), v, n_iter, tol,
                               check_every)
            y = apply(geom, v, wd)
            sigma = _layer_norms(y, 1)
            u = y / sigma.clamp_min(torch.finfo(acc).tiny)
    sigma = sigma[0]
    if torch.is_grad_enabled() and w.requires_grad:
        surrogate = (u * apply(geom, v, w.to(acc))).sum()    # value sigma, gradient u (A_W v)^T
        sigma = sigma + (surrogate - surrogate.detach())
    return ConvNorm(sigma, v[0], it, method)


def lanczos(matvec, v0: torch.Tensor, n_iter: int, tol: Optional[float] = None,
            check_every: int = 5) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Lanczos for the largest eigenvalue of the symmetric PSD operator ``matvec`` (here
    A^T A), with full reorthogonalization done twice per step against the Krylov basis kept as
    one matrix (n_iter x numel) (two matrix-vector products instead of a Python loop over the basis, as
    _power.lanczos does for lists of tensors).  Returns (theta, unit Ritz vector shaped like
    v0, operator applications).  With ``tol``: stops when theta changed by at most tol
    (relative) since the previous check (one host sync per check); also stops on an invariant
    subspace (a zero residual, read at the checks)."""
    shape, n = v0.shape, v0.numel()
    k_max = min(n_iter, n)
    Q = v0.new_zeros(k_max, n)
    q = v0.reshape(-1)
    Q[0] = q / torch.linalg.vector_norm(q)
    alphas, betas = [], []
    prev, k = None, 0
    for j in range(k_max):
        k = j + 1
        w = matvec(Q[j].reshape(shape)).reshape(-1)
        alphas.append(torch.dot(w, Q[j]))
        for _ in range(2):        # "twice is enough" (Parlett): orthogonal to working precision
            w = w - Q[:k].T @ (Q[:k] @ w)
        beta = torch.linalg.vector_norm(w)
        if tol is not None and k % check_every == 0:
            theta = _tridiag_top(alphas, betas)[0]
            done = prev is not None and bool((theta - prev).abs() <= tol * theta)
            if done or not bool(beta > 1e-12 * theta):
                break
            prev = theta
        if k < k_max:
            # Normalized and orthogonalized again: where the Krylov space is (nearly) invariant,
            # beta is at rounding level and w / beta is noise that is no longer orthogonal to Q;
            # projecting it out makes it a valid new direction (a restart), and the coupling to
            # the old space is beta, tiny, so T stays exact.
            q = w * torch.where(beta > 0, 1.0 / beta, 0.0)
            for _ in range(2):
                q = q - Q[:k].T @ (Q[:k] @ q)
            qn = torch.linalg.vector_norm(q)
            Q[k] = q * torch.where(qn > 0, 1.0 / qn, 0.0)
            betas.append(beta)
    theta, y = _tridiag_top(alphas, betas)
    vec = (y.to(Q.dtype) @ Q[:k]).reshape(shape)
    return theta, vec / torch.linalg.vector_norm(vec), k


def _tridiag_top(alphas, betas):
    """The largest eigenvalue of the Lanczos tridiagonal matrix and its eigenvector (float64)."""
    theta, Y = _power.tridiagonal_eigh(alphas, betas)
    return theta[-1], Y[:, -1]


def converged_norm(geom: ConvGeometry, w: torch.Tensor, v0: Optional[torch.Tensor] = None,
                   tol: Optional[float] = None, max_matvecs: int = 3000,
                   max_bytes: int = 256 << 20) -> torch.Tensor:
    """sigma to convergence, for monitoring (synchronizes), in the accumulation dtype of the
    weight (float64 for float64 weights, else float32): exact by FFT where the map is a circular
    convolution, else restarted Lanczos from v0 (or a seeded random vector): cycles of at most
    ``max_bytes`` of Krylov vectors, each restarted from the last Ritz vector, until the Ritz
    value (sigma^2) changes by at most ``tol`` (relative; default 1e-10 in float64, 1e-6 in
    float32, about what rounding allows) between checks 10 iterations apart or between
    cycles."""
    acc = _checks.acc_dtype(w.dtype)
    w = w.detach().to(acc)
    if tol is None:
        tol = 1e-10 if acc == torch.float64 else 1e-6
    if geom.fft_exact:
        return fft_norm(geom, w)
    numel = math.prod(geom.in_size)
    itemsize = torch.finfo(acc).bits // 8
    cycle = int(max(20, min(300, numel, max_bytes // (itemsize * numel))))
    if v0 is None:
        gen = torch.Generator().manual_seed(0)
        v0 = torch.randn(geom.in_size, generator=gen, dtype=torch.float64)
    v = v0.detach().to(device=w.device, dtype=acc).unsqueeze(0)
    prev, used = None, 0
    with torch.no_grad():
        while True:
            value, v, k = lanczos(lambda q: adjoint(geom, apply(geom, q, w), w), v, cycle, tol, 10)
            used += k
            if (prev is not None and float((value - prev).abs()) <= tol * float(value)) \
                    or used >= max_matvecs or k < cycle or cycle >= numel:
                break
            prev = value
        return _layer_norms(apply(geom, v, w), 1)[0]


# ---- input sizes -------------------------------------------------------------------------------

# module -> (input size, output size) of its first forward since a hook was put on it; weak, so
# a module that is gone leaves nothing behind.  Any regularizer following the module reads it.
_RECORDED: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[int, ...], Tuple[int, ...]]]" = \
    weakref.WeakKeyDictionary()


class _RecordSize:
    """Forward hook: records the module's input and output size (no batch dim), then removes
    itself.  It holds nothing but its own id, so a deep copy of the model (which copies its
    hooks) records into the copy's entry."""

    def __init__(self):
        self.id = None

    def __call__(self, module, args, output):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
            nd = len(module.kernel_size)
            batched = x.dim() == nd + 2
            _RECORDED[module] = (tuple(x.shape[1:] if batched else x.shape),
                                 tuple(output.shape[1:] if batched else output.shape))
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs,
                      module._forward_hooks_always_called):
            hooks.pop(self.id, None)


def _watch(module: nn.Module) -> None:
    """Put a recording hook on module unless it has one or its size was recorded."""
    if module in _RECORDED or any(isinstance(h, _RecordSize)
                                  for h in module._forward_hooks.values()):
        return
    hook = _RecordSize()
    hook.id = module.register_forward_hook(hook).id


def record_input_sizes(model: nn.Module, *args, **kwargs) -> Dict[str, Tuple[int, ...]]:
    """Runs ``model(*args, **kwargs)`` once (no grad) and returns {module name: (C, *spatial)}
    for every conv it ran."""
    found: Dict[str, Tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, CONV_TYPES):
            def hook(m, a, out, name=name):
                x = a[0]
                found.setdefault(name, tuple(x.shape[1:] if x.dim() == len(m.kernel_size) + 2
                                             else x.shape))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


# ---- the regularizer's operator mode -----------------------------------------------------------

def _seeded_vector(size, seed: int, name: str, device, dtype) -> torch.Tensor:
    """A unit vector of shape size, drawn from (seed, name) alone: which conv gets its size first
    does not change anyone's vector."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))
    v = torch.randn(size, generator=gen, dtype=torch.float64)
    v = v / torch.linalg.vector_norm(v)
    return v.to(device=device, dtype=dtype)


#: convs of equal geometry are stacked into one grouped conv call when each weight has at most
#: this many elements.  Measured on the CPU (2 threads, benchmarks/conv_operator.py's set-up):
#: 24 convs 16->16 or 32->32 (3x3, 8x8 inputs) step 2-6x faster stacked (the per-call cost
#: dominates), but 12 convs 128->128 and 6 convs 512->512 step 1.5-4x SLOWER stacked (the
#: weights' concatenation and the grouped conv kernel).  Not measured on a GPU.
BATCH_MAX_NUMEL = 1 << 15


class _Group(NamedTuple):
    geom: ConvGeometry
    idx: List[int]
    parametrized: bool


class OperatorMode:
    """The state of ``conv_norm="operator"`` that is not in the state_dict: which weights are
    convs, the sizes given by the user, and a cached step plan.  The vectors themselves are the
    regularizer's buffers ``operator_vectors.<name>`` (input-shaped, created once the input size
    is known).  Holds no reference to the regularizer or the model."""

    def __init__(self, reg, model: nn.Module, input_sizes):
        self.idx: List[int] = []
        for i, site in enumerate(reg._sites):
            mod = model.get_submodule(site.path) if site.path else model
            if site.key == "weight" and isinstance(mod, CONV_TYPES):
                self.idx.append(i)
        self.set = frozenset(self.idx)
        self.batch = True     # stack small convs of equal geometry (tests turn it off to compare)
        self._plan = None
        sizes = self._user_sizes(reg, model, input_sizes)
        for i, size in sizes.items():
            mod = model.get_submodule(reg._sites[i].path)
            geometry(mod, size, reg.names[i])                  # can this conv take it?
        for i, size in sizes.items():
            self._create(reg, i, size, _weight_of(model.get_submodule(reg._sites[i].path)))
        self.watch(reg, model)

    def _user_sizes(self, reg, model, input_sizes) -> Dict[int, Tuple[int, ...]]:
        if input_sizes is None:
            return {}
        if not isinstance(input_sizes, dict):
            raise TypeError("input_sizes must be a dict {conv module name or weight name: "
                            f"(channels, *spatial)}}, got {type(input_sizes).__name__}")
        by_name = {}
        for i in self.idx:
            by_name[reg.names[i]] = i
            by_name[reg._sites[i].path] = i
        out = {}
        for key, size in input_sizes.items():
            if key not in by_name:
                raise ValueError(f"input_sizes names {key!r}, which is not a conv whose weight "
                                 "this regularizer holds (convs: "
                                 f"{', '.join(reg._sites[i].path for i in self.idx) or 'none'})")
            out[by_name[key]] = size
        return out

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        new._plan = None
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    # -- vectors --

    def watch(self, reg, model: nn.Module) -> None:
        """Hooks on the convs whose input size is not known yet."""
        bufs = reg.operator_vectors._buffers
        for i in self.idx:
            if reg._keys[i] not in bufs:
                site = reg._sites[i]
                _watch(model.get_submodule(site.path) if site.path else model)

    def _create(self, reg, i: int, size, w: torch.Tensor) -> None:
        v = _seeded_vector(size, reg.seed, reg.names[i], w.device, _checks.acc_dtype(w.dtype))
        reg.operator_vectors.register_buffer(reg._keys[i], v)

    def before_load(self, reg, state_dict, prefix: str) -> None:
        """Called by the regularizer's _load_from_state_dict before anything is copied: checks
        each loaded input-shaped vector and registers the buffers not created yet (so a run
        resumes before its first forward)."""
        bufs = reg.operator_vectors._buffers
        new = {}
        for i in self.idx:
            key = f"{prefix}operator_vectors.{reg._keys[i]}"
            v = state_dict.get(key)
            if v is None:
                continue
            name = reg.names[i]
            have = bufs.get(reg._keys[i])
            if have is not None and tuple(have.shape) != tuple(v.shape):
                raise ValueError(f"the loaded operator vector of {name} has the input size "
                                 f"{tuple(v.shape)}, but this regularizer recorded "
                                 f"{tuple(have.shape)}; load a state of the same model and input")
            if v.device.type != "meta":
                n = float(torch.linalg.vector_norm(v.double()))
                if not 0 < n < float("inf"):
                    raise ValueError(f"the loaded operator vector of {name} is "
                                     f"{'zero' if n == 0 else 'not finite'}: a power iteration "
                                     "from it never recovers")
            if have is None:
                b = reg._bind()
                w = reg._weights_now(b)[i]
                geometry(b.mods[i], tuple(v.shape), name)        # a size the conv can take
                new[reg._keys[i]] = torch.empty(tuple(v.shape), device=w.device,
                                                dtype=_checks.acc_dtype(w.dtype))
        for k, t in new.items():
            reg.operator_vectors.register_buffer(k, t)

    # -- the plan: groups of equal geometry, checked before anything changes --

    def plan(self, reg, b, active: List[int]):
        """The groups for these active conv indices; creates vectors whose size became known
        and moves vectors to their weight's device.  Raises (before changing anything else)
        when a size is still unknown or a conv can no longer take it."""
        bufs = reg.operator_vectors._buffers
        p = self._plan
        if p is not None and p[0] is b and p[1] == active and all(
                bufs.get(reg._keys[i]) is t for i, t in p[2]):
            return p[3]
        missing, pending = [], {}
        for i in active:
            if reg._keys[i] in bufs:
                continue
            rec = _RECORDED.get(b.mods[i])
            if rec is None:
                missing.append(reg._sites[i].path)
            else:
                pending[i] = rec
        if missing:
            raise RuntimeError(
                "conv_norm='operator' needs the input size of each conv: run one forward pass of "
                "the model first (a hook records them) or pass input_sizes={'conv name': "
                f"(channels, *spatial)}}; not known yet for: {', '.join(missing)}")
        weights = reg._weights_now(b)
        geoms = {}
        for i in active:
            w = weights[i]
            if hasattr(w, "full_tensor"):
                raise TypeError(f"conv_norm='operator' does not take sharded (DTensor) conv "
                                f"weights ({reg.names[i]}); use conv_norm='matricized'")
            size = pending[i][0] if i in pending else tuple(bufs[reg._keys[i]].shape)
            geoms[i] = geometry(b.mods[i], size, reg.names[i], tuple(w.shape))
            if i in pending and geoms[i].out_size != pending[i][1]:
                raise RuntimeError(
                    f"{reg.names[i]}: its first forward gave an output of size "
                    f"{pending[i][1]}, but the module's own settings give {geoms[i].out_size} "
                    "(a ConvTranspose called with output_size=...?); conv_norm='operator' takes "
                    "the module's output_padding: set it, or use conv_norm='matricized'")
        # every check passed: only now create or move vectors
        for i in active:
            w = weights[i]
            if i in pending:
                self._create(reg, i, pending[i][0], w)
            v = bufs[reg._keys[i]]
            if v.device != w.device:
                bufs[reg._keys[i]] = (_seeded_vector(v.shape, reg.seed, reg.names[i], w.device,
                                                     v.dtype) if v.device.type == "meta"
                                      else v.to(w.device))
        groups: Dict[tuple, List[int]] = {}
        for i in active:
            w = weights[i]
            alone = not self.batch or w.numel() > BATCH_MAX_NUMEL
            key = (i in b.parametrized, geoms[i], w.dtype, w.device, i if alone else None)
            groups.setdefault(key, []).append(i)
        out = [_Group(k[1], idx, k[0]) for k, idx in groups.items()]
        self._plan = (b, list(active), [(i, bufs[reg._keys[i]]) for i in active], out)
        return out

    # -- step and penalty --

    def step(self, reg, b, groups) -> Tuple[List[int], List[torch.Tensor]]:
        """Adds lam*sigma*dsigma/dW into each conv's gradient; returns (order, sigmas)."""
        bufs = reg.operator_vectors._buffers
        order, parts = [], []
        for grp in groups:
            vs = [bufs[reg._keys[i]] for i in grp.idx]
            if grp.parametrized:       # autograd carries it through the parametrization
                with torch.enable_grad():
                    ws = [getattr(b.parametrized[i], reg._sites[i].key) for i in grp.idx]
                    sig = self._sigma(grp, ws, vs, reg.n_iter)
                    (reg.lam / 2 * (sig * sig).sum()).backward(inputs=reg._originals(b, grp.idx))
                parts.append(sig.detach())
            else:
                ps = [b.params[i] for i in grp.idx]
                sig, u, v, w = self._iterate(grp, ps, vs, reg.n_iter)
                L = len(ps)
                gw = weight_grad(grp.geom, v, _per_layer(u, reg.lam * sig, L), w, L)
                for p in ps:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                if L == 1:
                    ps[0].grad.add_(gw)
                else:
                    for p, part in zip(ps, gw.reshape(L, *grp.geom.weight_shape).unbind(0)):
                        p.grad.add_(part)
                parts.append(sig)
            order += grp.idx
        return order, parts

    def penalty_sigmas(self, reg, b, groups, weights) -> Tuple[List[int], List[torch.Tensor]]:
        """Differentiable sigmas (gradient lam*sigma*dsigma/dW through autograd)."""
        bufs = reg.operator_vectors._buffers
        order, parts = [], []
        for grp in groups:
            parts.append(self._sigma(grp, [weights[i] for i in grp.idx],
                                     [bufs[reg._keys[i]] for i in grp.idx], reg.n_iter))
            order += grp.idx
        return order, parts

    @staticmethod
    def _iterate(grp: _Group, ws, vs, n_iter):
        """Power iterations for one group (no grad); writes the new vectors back."""
        L, geom = len(ws), grp.geom
        with torch.no_grad():
            acc = vs[0].dtype
            w = (ws[0] if L == 1 else torch.cat(ws)).detach().to(acc)
            v = vs[0].unsqueeze(0) if L == 1 else torch.stack(vs).reshape(1, -1, *geom.in_size[1:])
            sig, u, v = power_iterations(geom, w, v, L, n_iter)
            if L == 1:
                vs[0].copy_(v[0])
            else:
                torch._foreach_copy_(vs, list(v.reshape(L, *geom.in_size).unbind(0)))
        return sig, u, v, w

    def _sigma(self, grp: _Group, ws, vs, n_iter) -> torch.Tensor:
        """sigma per layer with the gradient of <u, A_W v> (u, v fixed): straight-through, the
        value stays the power iteration's sigma."""
        sig, u, v, _ = self._iterate(grp, ws, vs, n_iter)
        L = len(ws)
        if not torch.is_grad_enabled() or not any(w.requires_grad for w in ws):
            return sig
        w = (ws[0] if L == 1 else torch.cat(ws)).to(vs[0].dtype)
        surrogate = (u * apply(grp.geom, v, w, L)).reshape(L, -1).sum(1)
        return sig + (surrogate - surrogate.detach())

    # -- monitoring --

    @torch.no_grad()
    def exact_sigma(self, reg, b, i: int, w: torch.Tensor) -> torch.Tensor:
        """The converged operator norm of conv i, warm-started from its vector."""
        groups = self.plan(reg, b, [i])
        v = reg.operator_vectors._buffers[reg._keys[i]]
        return converged_norm(groups[0].geom, w, v0=v)


# ---- reporting ---------------------------------------------------------------------------------

def conv_norm_report(model, input_sizes: Optional[Dict[str, Sequence[int]]] = None,
                     example_input=None, file=None) -> List[dict]:
    """Per conv layer, the matricized sigma (the paper's: ``W.reshape(out, -1)``, by SVD)
    against the operator sigma on its input (converged: FFT where exact, else restarted Lanczos
    in the weights' precision, float32 or float64: :func:`converged_norm`).  ``model`` is a model with ``input_sizes`` ({module name: (C, *spatial)}) or
    ``example_input`` (one forward records them), or a SpectralNormRegularizer built with
    conv_norm="operator" (its recorded sizes, warm-started from its vectors).  Prints a table to
    ``file`` (default stdout; None-like ``False`` prints nothing) and returns its rows."""
    from .regularizer import SpectralNormRegularizer
    reg = model if isinstance(model, SpectralNormRegularizer) else None
    if reg is not None:
        if reg._conv is None:
            raise ValueError("conv_norm_report takes a regularizer built with "
                             "conv_norm='operator' (or a model and its input sizes)")
        b = reg._bind()
        weights = reg._weights_now(b)
        items = []
        for i in reg._conv.idx:
            v = reg.operator_vectors._buffers.get(reg._keys[i])
            if v is None:
                raise RuntimeError(f"the input size of {reg._sites[i].path} is not known yet: "
                                   "run one forward pass first")
            items.append((reg._sites[i].path, b.mods[i], weights[i], tuple(v.shape), v))
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a SpectralNormRegularizer, got "
                            f"{type(model).__name__}")
        if (input_sizes is None) == (example_input is None):
            raise ValueError("give exactly one of input_sizes and example_input")
        if example_input is not None:
            sizes = record_input_sizes(model, *(example_input if isinstance(example_input, tuple)
                                                else (example_input,)))
        else:
            sizes = dict(input_sizes)
        items = []
        for name, mod in model.named_modules():
            if isinstance(mod, CONV_TYPES) and name in sizes:
                items.append((name, mod, _weight_of(mod), tuple(sizes[name]), None))
        unknown = set(sizes) - {it[0] for it in items}
        if unknown:
            raise ValueError(f"input_sizes names modules that are not convs of the model: "
                             f"{', '.join(sorted(unknown))}")
    rows = []
    with torch.no_grad():
        for name, mod, w, size, v in items:
            geom = geometry(mod, size, name)
            m = w.detach().double().reshape(w.shape[0], -1)
            mat = float(torch.linalg.matrix_norm(m, ord=2))
            op = float(converged_norm(geom, w, v0=v))
            rows.append(dict(name=name, geometry=geom.describe(), matricized=mat, operator=op,
                             ratio=op / mat if mat > 0 else float("nan")))
    if file is not False:
        out = file or sys.stdout
        width = max([len(r["name"]) for r in rows] + [5])
        print(f"{'layer':{width}s} {'matricized':>11s} {'operator':>10s} {'op/mat':>7s}  geometry",
              file=out)
        for r in rows:
            print(f"{r['name']:{width}s} {r['matricized']:11.4f} {r['operator']:10.4f} "
                  f"{r['ratio']:7.3f}  {r['geometry']}", file=out)
    return rows

