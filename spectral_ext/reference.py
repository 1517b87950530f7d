"""Pure-PyTorch semantics of spectral_ext: the fallback kernel and the oracle every backend is
tested against.  Written for clarity, one layer at a time; it never synchronises with the device
(no ``.item()``, no data-dependent Python branches).

For each weight W, matricized along dim 0 (``W.reshape(W.shape[0], -1)``: a conv weight
out x in x kh x kw becomes out x in*kh*kw), and its persistent vector v, one power iteration is::

    u  = normalize(W v)
    v' = W^T u
    sigma = ||v'||
    v  = v' / sigma

(The paper's pseudo-code writes sigma = ||u|| / ||v||, which read literally is 1/sigma.)  After
``n_iter`` iterations the fused step adds the gradient of lam/2 * sigma^2, i.e.
``grad += lam * sigma * u v^T`` with the final u and v.

Arithmetic is done in the accumulation dtype: float64 for float64 weights, float32 otherwise
(bfloat16/float16 weights are upcast); the squared norms are summed in float64.  The gradient is
rounded to its own dtype once.

Edge cases, identical in every backend:

* a zero matrix (W v == 0): u = 0, sigma = 0, nothing is added, and v is left unchanged (still a
  unit vector; no NaN);
* non-finite weights: NaN/Inf propagate into sigma and into that layer's gradient (so a
  ``GradScaler`` or an anomaly check sees them), but v is left unchanged, so the state recovers
  once the weights are finite again.  Other layers are unaffected.  No check is made on the host:
  that would need a synchronisation.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _checks

__all__ = ["power_iteration", "spectral_norms", "fused_step", "init_vectors"]


def _norm(x: torch.Tensor) -> torch.Tensor:
    # squared norms are summed in float64 whatever the accumulation dtype: a float32 sum of
    # squares overflows for entries above ~1e19, long before the values themselves do
    return torch.linalg.vector_norm(x, dtype=torch.float64).to(x.dtype)


def power_iteration(w: torch.Tensor, v: torch.Tensor, n_iter: int = 1
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iter`` power iterations on one weight; a pure function.

    Returns ``(sigma, u, v_new)`` in the accumulation dtype: sigma is 0-d, u has length
    ``w.shape[0]``, v_new has the length of v.
    """
    acc = _checks.acc_dtype(w.dtype)
    W = w.detach().reshape(w.shape[0], -1).to(acc)
    v = v.detach().to(acc)
    sigma = u = None
    for _ in range(n_iter):
        u_raw = torch.mv(W, v)
        nrm = _norm(u_raw)
        # u = u_raw / ||u_raw||, and u = 0 for a zero matrix; `nrm == 0` (not `nrm > 0`) so
        # that a NaN norm propagates instead of being mistaken for zero.
        u = u_raw * torch.where(nrm == 0, 0.0, 1.0 / nrm)
        v_prime = torch.mv(W.t(), u)
        sigma = _norm(v_prime)
        # keep the old v when sigma is 0 (zero matrix) or not finite (NaN/Inf weights)
        ok = (sigma > 0) & torch.isfinite(sigma)
        v = torch.where(ok, v_prime / sigma, v)
    return sigma, u, v


def spectral_norms(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], n_iter: int = 1
                   ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Functional form: ``(sigma [L], us, vs_new)``; nothing is mutated.

    sigma is differentiable with respect to each weight with the gradient of the paper,
    dsigma_l/dW_l = u_l v_l^T (u, v the final singular-vector estimates, held constant), so
    ``(lam / 2 * sigma**2).sum()`` has exactly the gradient that the fused step adds.  us are in
    the accumulation dtype, each vs_new in the dtype of its v.
    """
    weights, vs = _checks.check_weights_and_vectors(weights, vs)
    n_iter = _checks.check_n_iter(n_iter)
    sigma, us, vs_new = spectral_norms_values(weights, vs, n_iter)
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        # straight-through: the value stays sigma, the gradient is u v^T, because
        # d(u^T W v)/dW = u v^T for constant u, v (and u^T W v = sigma at the computed u, v).
        surrogate = torch.stack([
            torch.dot(u, torch.mv(w.reshape(w.shape[0], -1).to(u.dtype), vn.to(u.dtype)))
            for w, u, vn in zip(weights, us, vs_new)]).to(sigma.dtype)
        sigma = sigma + (surrogate - surrogate.detach())
    return sigma, us, vs_new


def spectral_norms_values(weights: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int
                          ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """The values of :func:`spectral_norms` without checks or gradient (the op's fallback kernel)."""
    sdtype = _checks.sigma_dtype(weights)
    sigmas, us, vs_new = [], [], []
    for w, v in zip(weights, vs):
        s, u, vn = power_iteration(w, v, n_iter)
        sigmas.append(s.to(sdtype))
        us.append(u)
        vs_new.append(vn.to(v.dtype))
    if not sigmas:
        return torch.empty(0), [], []
    return torch.stack(sigmas), us, vs_new


def _fused_step_unchecked(weights: List[torch.Tensor], vs: List[torch.Tensor],
                          grads: List[torch.Tensor], lam: float, n_iter: int) -> torch.Tensor:
    sdtype = _checks.sigma_dtype(weights)
    sigmas = []
    with torch.no_grad():
        for w, v, g in zip(weights, vs, grads):
            s, u, vn = power_iteration(w, v, n_iter)
            # one rounding into the gradient's dtype: the outer product is in the acc dtype
            g.add_((lam * s * torch.outer(u, vn)).reshape(g.shape))
            v.copy_(vn)
            sigmas.append(s.to(sdtype))
    if not sigmas:
        return torch.empty(0)
    return torch.stack(sigmas)


def fused_step(weights: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], *, lam: float = 0.01,
               n_iter: int = 1, grads: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """One regularizer step for every layer: updates each v in place, adds lam*sigma*u v^T to each
    gradient (default: each weight's ``.grad``, created if None) and returns sigma per layer
    (float32, or float64 if any weight is float64).  A drop-in for ``spectral_ext.fused_step``.
    """
    weights, vs, grads, lam, n_iter = _checks.check_fused_step_args(weights, vs, grads, lam, n_iter)
    grads = _checks.resolve_grads(weights, grads)
    return _fused_step_unchecked(weights, vs, grads, lam, n_iter)


def init_vectors(weights: Sequence[torch.Tensor], *, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Random unit vectors, one per weight (length in*kh*kw), drawn on the CPU from a seeded
    generator (so they are the same on every device) and moved to each weight's device.
    float64 for float64 weights, float32 otherwise."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    out = []
    for i, w in enumerate(weights):
        if w.dim() < 2 or w.numel() == 0:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}; need a non-empty matrix")
        _, cols = _checks.matrix_shape(w)
        v = torch.randn(cols, generator=generator, dtype=torch.float64)
        v = v / torch.linalg.vector_norm(v)
        out.append(v.to(device=w.device, dtype=_checks.acc_dtype(w.dtype)))
    return out
