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
* "unchanged" is bit for bit, in v's own dtype (a float64 v of a float32 layer is not rounded);
* the whole finite range of each dtype works: u is u_raw divided by its norm (never multiplied
  by 1/norm, which overflows float32 when ||W v|| < 3e-39), the divisions by a norm are done in
  float64, and the norms of float64 vectors are taken after scaling by a power of two (their
  squares leave the double range below 1e-154 and above 1e154).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _checks

__all__ = ["power_iteration", "spectral_norms", "fused_step", "init_vectors"]


def _norm64(x: torch.Tensor) -> torch.Tensor:
    """||x|| in float64 (0-d).  Squares are summed in float64 whatever x's dtype (a float32 sum of
    squares overflows for entries above ~1e19); a float64 x is first scaled by a power of two
    (exact), since its squares can leave the double range."""
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dtype=torch.float64)
    e = torch.frexp(x.abs().amax())[1].to(torch.float64)   # 0 for a zero vector
    return _ldexp(torch.linalg.vector_norm(_ldexp(x, -e)), e)


def _ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x * 2^e, exact: in two halves, since torch.ldexp forms 2^e, which overflows for e > 1023
    (a subnormal x needs up to 2^1074)."""
    half = torch.trunc(e / 2)
    return torch.ldexp(torch.ldexp(x, half), e - half)


def _divide(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x / d in float64, rounded once to x's dtype; 0 where d is 0 (`d == 0`, not `d > 0`: a NaN
    norm must propagate, not be mistaken for zero)."""
    q = x.to(torch.float64) / torch.where(d == 0, 1.0, d)
    return torch.where(d == 0, 0.0, q).to(x.dtype)


def _power_iteration(w: torch.Tensor, v: torch.Tensor, n_iter: int):
    """power_iteration, plus whether some iteration gave a new v (a 0-d bool tensor)."""
    acc = _checks.acc_dtype(w.dtype)
    W = w.detach().reshape(w.shape[0], -1).to(acc)
    v = v.detach().to(acc)
    sigma = u = None
    updated = torch.zeros((), dtype=torch.bool, device=w.device)
    for _ in range(n_iter):
        u_raw = torch.mv(W, v)
        # u = u_raw / ||u_raw||, and u = 0 for a zero matrix
        u = _divide(u_raw, _norm64(u_raw))
        v_prime = torch.mv(W.t(), u)
        sigma64 = _norm64(v_prime)
        sigma = sigma64.to(acc)
        # keep the old v when sigma is 0 (zero matrix) or not finite (NaN/Inf weights)
        ok = (sigma > 0) & torch.isfinite(sigma)
        v = torch.where(ok, _divide(v_prime, sigma64), v)
        updated = updated | ok
    return sigma, u, v, updated


def power_iteration(w: torch.Tensor, v: torch.Tensor, n_iter: int = 1
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iter`` power iterations on one weight; a pure function.

    Returns ``(sigma, u, v_new)`` in the accumulation dtype: sigma is 0-d, u has length
    ``w.shape[0]``, v_new has the length of v.
    """
    sigma, u, v, _ = _power_iteration(w, v, n_iter)
    return sigma, u, v


def _new_v(v_old: torch.Tensor, v_acc: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
    """The new v in v_old's dtype: v_acc if some iteration updated it, else v_old bit for bit."""
    return torch.where(updated, v_acc.to(v_old.dtype), v_old.detach())


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
        s, u, vn, updated = _power_iteration(w, v, n_iter)
        sigmas.append(s.to(sdtype))
        us.append(u)
        vs_new.append(_new_v(v, vn, updated))
    if not sigmas:
        return torch.empty(0), [], []
    return torch.stack(sigmas), us, vs_new


def _fused_step_unchecked(weights: List[torch.Tensor], vs: List[torch.Tensor],
                          grads: List[torch.Tensor], lam: float, n_iter: int) -> torch.Tensor:
    sdtype = _checks.sigma_dtype(weights)
    sigmas = []
    with torch.no_grad():
        for w, v, g in zip(weights, vs, grads):
            s, u, vn, updated = _power_iteration(w, v, n_iter)
            # one rounding into the gradient's dtype: the outer product is in the acc dtype
            g.add_((lam * s * torch.outer(u, vn)).reshape(g.shape))
            v.copy_(_new_v(v, vn, updated))
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
    grads = _checks.resolve_grads(weights, grads, vs)
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
