"""The spectral radius of the loss Hessian, as an estimator and as a regularizer
(Sandler, Klabjan & Luo, arXiv:2102.11210).

    rho, v = hessian.spectral_radius(loss_fn, params, n_iter=20, tol=1e-3)
    reg = hessian.SpectralRadiusRegularizer(mu=0.01)
    total = reg(loss_fn, params)        # loss_fn() + mu * rho, differentiable
    total.backward()

rho = max |lambda_i(H)|, H = d^2 loss / d params^2, by power iteration (or Lanczos) on
Hessian-vector products: the gradient graph of one forward/backward is built once
(``create_graph=True``) and each iteration is one more backward through it (double backward).

The regularizer follows the paper and the first author's code (github.com/ars2240/
optWBoundEigenval, ``opt.py``: ``comp_rho``, ``comp_g``, ``iter``, read for this): the
eigenvalue is the Rayleigh quotient lambda = v^T H v of the power iteration's vector, the
spectral radius is rho = |lambda|, and the penalty is

    g = max(0, rho - upper, lower - rho)        (upper = K, lower = K_min; 0 and 0 give rho)

whose gradient, with v held fixed, is dg/drho * sign(lambda) * d (v^T H v) / d theta (a
third-order term; dg/drho is +1, -1 or 0).  With ``convergence="residual"`` the estimate counts
as converged when ||H v - lambda v|| <= tol * |lambda|, and ``skip_unconverged=True`` makes a
step whose estimate has not converged add no penalty, without a host sync.

Where this deliberately differs from ``opt.py``:
* the gradient is sign(lambda) * d lambda / d theta = d rho / d theta; ``opt.py`` uses
  d lambda / d theta (``vGHv``) whatever the sign of lambda, which for a dominant negative
  eigenvalue pushes rho up, not down;
* the residual test is relative (tol * |lambda|, scale-free); ``opt.py`` stops when any of the
  absolute residual ||H v - lambda v||, its relative change or the relative change of lambda is
  below ``pow_iter_eps`` (1e-3), after up to 1000 iterations per step;
* an unconverged step adds nothing; ``opt.py`` (``ignore_bad_vals``) sets rho = -1 and draws a
  new random v, which its g then treats as below K_min (g = K_min + 1, a gradient along the
  random v): we read that as an artefact, not the method;
* by default upper = lower = 0 (g = rho) and the iteration runs a fixed n_iter warm-started
  steps (no convergence test, no host sync), every step adding its penalty.  ``grad_method="autograd"`` obtains it by
differentiating the HVP (one more backward through the double-backward graph);
``grad_method="finite_difference"`` uses the cheaper central difference of gradients along v,
    d (v^T H v) / d theta ~ (g(theta + eps v) - 2 g(theta) + g(theta - eps v)) / eps^2,
two extra gradient evaluations of loss_fn at perturbed parameters (restored exactly after);
it assumes the loss is smooth within eps of theta along v (a ReLU kink that some sample crosses
there makes it wrong: use "autograd" for such networks when exactness matters).
"""

import contextlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _checks, _power

__all__ = ["hvp_operator", "spectral_radius", "top_eigenvalue", "EigenEstimate",
           "rayleigh_quotient", "penalty", "SpectralRadiusRegularizer"]

METHODS = ("power", "lanczos")


def _check_params(params) -> List[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: need at least one tensor to differentiate against")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad: the Hessian is taken with "
                             "respect to params, so each must have requires_grad=True")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; need a floating-point dtype")
    return params


def _check_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn() must return a scalar tensor, got "
                         f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
    return loss.reshape(())


def _check_common(n_iter, tol, method, convergence="change"):
    _checks.check_n_iter(n_iter)
    _checks.check_optional_positive("tol", tol)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if convergence not in _power.CRITERIA:
        raise ValueError(f"convergence must be one of {_power.CRITERIA}, got {convergence!r}")
    if convergence == "residual" and method != "power":
        raise ValueError("convergence='residual' (the Rayleigh-quotient residual test) is "
                         "implemented for method='power' only")


def _check_vector(v0, params, name="v0") -> List[torch.Tensor]:
    v0 = list(v0)
    if len(v0) != len(params) or any(a.shape != p.shape for a, p in zip(v0, params)):
        raise ValueError(f"{name} must be a list of tensors shaped like params: got shapes "
                         f"{[tuple(a.shape) for a in v0]} for params {[tuple(p.shape) for p in params]}")
    return [a.detach().to(device=p.device, dtype=p.dtype) for a, p in zip(v0, params)]


def hvp_operator(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                 create_graph: bool = False) -> Callable[[List[torch.Tensor]], List[torch.Tensor]]:
    """v -> H v from gradients computed with ``create_graph=True`` (the graph is kept for
    further products).  A gradient that does not depend on the parameters (a loss linear in
    them) contributes zero."""
    pairs = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(v):
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad([grads[i] for i in pairs], params,
                                 grad_outputs=[v[i] for i in pairs], retain_graph=True,
                                 create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]
    return hvp


def _gradients(loss_fn, params, create_graph: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    with torch.enable_grad(), (_power.twice_differentiable() if create_graph
                               else contextlib.nullcontext()):
        loss = _check_loss(loss_fn())
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _iterate(hvp, v0, n_iter, tol, method, check_every, convergence="change"):
    if method == "lanczos":
        dim = sum(t.numel() for t in v0)
        return _power.lanczos(hvp, v0, min(n_iter, dim), tol, check_every)
    return _power.power_iteration(hvp, v0, n_iter, tol, check_every, criterion=convergence)


def spectral_radius(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                    n_iter: int = 20, tol: Optional[float] = 1e-3,
                    v0: Optional[Sequence[torch.Tensor]] = None, method: str = "power",
                    check_every: int = 5, generator: Optional[torch.Generator] = None,
                    convergence: str = "change") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(rho, v): rho = max |lambda(H)| (0-d tensor) of the Hessian of loss_fn() with respect to
    params, and the unit eigenvector v (a list shaped like params; pass it back as v0 to warm
    start).  ``method="lanczos"`` converges in fewer iterations at the cost of n_iter stored
    vectors.  ``tol``: stop when the relative change of rho is <= tol (``convergence=
    "residual"``: when ||H v - (v^T H v) v|| <= tol * |v^T H v|), checked every check_every
    iterations (one host sync per check); ``tol=None`` runs exactly n_iter iterations with no
    host synchronisation.  Nothing here changes the parameters' .grad."""
    params = _check_params(params)
    _check_common(n_iter, tol, method, convergence)
    _, grads = _gradients(loss_fn, params, create_graph=True)
    v0 = (_power.random_like(params, generator=generator) if v0 is None
          else _check_vector(v0, params))
    res = _iterate(hvp_operator(grads, params), v0, n_iter, tol, method, check_every,
                   convergence)
    return res.value, res.vector


class EigenEstimate(NamedTuple):
    eigenvalue: torch.Tensor     # v^T H v, signed (0-d)
    vector: List[torch.Tensor]   # the unit vector v, shaped like params
    residual: torch.Tensor       # ||H v - eigenvalue * v|| / |eigenvalue| (0-d)
    iterations: int


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                   n_iter: int = 20, tol: Optional[float] = 1e-3,
                   v0: Optional[Sequence[torch.Tensor]] = None, check_every: int = 5,
                   generator: Optional[torch.Generator] = None) -> EigenEstimate:
    """Sandler et al.'s estimate of the dominant eigenvalue: power iteration on H until the
    residual test ||H v - (v^T H v) v|| <= tol * |v^T H v| passes (checked every check_every
    iterations, one host sync each; ``tol=None`` runs n_iter iterations), then the Rayleigh
    quotient v^T H v (signed) and the residual of the returned v (converged: residual <= tol).
    One HVP more than :func:`spectral_radius` (the returned vector's own product)."""
    params = _check_params(params)
    _check_common(n_iter, tol, "power", "residual")
    _, grads = _gradients(loss_fn, params, create_graph=True)
    v0 = (_power.random_like(params, generator=generator) if v0 is None
          else _check_vector(v0, params))
    hvp = hvp_operator(grads, params)
    res = _power.power_iteration(hvp, v0, n_iter, tol, check_every, criterion="residual")
    q, r = _power.residual(res.vector, [h.detach() for h in hvp(res.vector)])
    return EigenEstimate(q.detach(), res.vector, r.detach(), res.iterations)


def _check_bounds(upper, lower) -> Tuple[float, float]:
    for name, b in (("upper", upper), ("lower", lower)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b != b:
            raise ValueError(f"{name} must be a number (inf allowed), got {b!r}")
    if lower > upper:
        raise ValueError(f"lower (K_min = {lower}) must be <= upper (K = {upper})")
    return float(upper), float(lower)


def penalty(eigenvalue: torch.Tensor, upper: float = 0.0, lower: float = 0.0
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(g, dg/dlambda) of Sandler et al.'s penalty g = max(0, rho - upper, lower - rho) on the
    spectral radius rho = |lambda|, elementwise, no gradient: dg/dlambda is sign(lambda) times
    +1 where rho - upper is the (positive) maximum, -1 where lower - rho is, 0 inside
    [lower, upper].  upper = lower = 0: g = |lambda|."""
    upper, lower = _check_bounds(upper, lower)
    lam = eigenvalue.detach()
    rho = lam.abs()
    above, below = rho - upper, lower - rho
    g = torch.clamp_min(torch.maximum(above, below), 0)
    coef = torch.where((above > 0) & (above >= below), torch.ones_like(lam),
                       torch.where(below > 0, -torch.ones_like(lam), torch.zeros_like(lam)))
    sign = torch.where(lam < 0, -torch.ones_like(lam), torch.ones_like(lam))
    return g, coef * sign


def rayleigh_quotient(loss_fn, params, v) -> torch.Tensor:
    """v^T H v / v^T v (signed; 0-d tensor): the eigenvalue itself when v is an eigenvector."""
    params = _check_params(params)
    v = _check_vector(v, params, "v")
    _, grads = _gradients(loss_fn, params, create_graph=True)
    return (_power.dot(v, hvp_operator(grads, params)(v)) / _power.sq_norm(v)).detach()


class SpectralRadiusRegularizer(nn.Module):
    """Adds ``mu * g(lambda)`` to a loss, with its gradient, as Sandler, Klabjan & Luo do.

    ``forward(loss_fn, params)`` returns ``loss_fn() + mu * g``: backward() of it gives the
    loss's gradient plus ``mu * dg/dlambda * d(v^T H v)/d theta`` (dg/dlambda = dg/drho *
    sign(lambda)) with v the top eigenvector,
    found by ``n_iter`` power (or Lanczos) iterations warm-started from the previous call's v,
    lambda = v^T H v (signed) and g = max(0, rho - upper, lower - rho) on rho = |lambda| (see
    :func:`penalty`; the defaults upper = lower = 0 give g = |lambda|).  The vector is kept in
    the module's state_dict (as extra state).  After a call: ``last_rho`` (||H v||, the power
    iteration's estimate of max |lambda|), ``last_eigenvalue`` (v^T H v), ``last_residual``
    (||H v - lambda v|| / |lambda|) and, with a tolerance and ``convergence="residual"``,
    ``last_converged`` (a bool tensor): tensors, so reading them is the caller's sync, not ours.

    tol / convergence: with a tol the iteration stops early (a host sync per check) when the
    relative change of the estimate (``"change"``) or the residual (``"residual"``, Sandler et
    al.'s test) is <= tol.  skip_unconverged (needs tol and ``convergence="residual"``): a step
    whose final residual exceeds tol adds no penalty (the term is multiplied by the test's
    outcome on the device: no sync).

    grad_method: "autograd" (exact third-order term by differentiating the HVP) or
    "finite_difference" (two extra gradient evaluations and one extra forward; eps defaults to
    the fourth root of the parameters' machine epsilon, the usual step for a second
    difference).
    """

    def __init__(self, mu: float, n_iter: int = 5, method: str = "power",
                 grad_method: str = "autograd", eps: Optional[float] = None,
                 tol: Optional[float] = None, check_every: int = 5, upper: float = 0.0,
                 lower: float = 0.0, convergence: str = "change",
                 skip_unconverged: bool = False):
        super().__init__()
        mu = _checks.check_coefficient("mu", mu)
        _check_common(n_iter, tol, method, convergence)
        if grad_method not in ("autograd", "finite_difference"):
            raise ValueError("grad_method must be 'autograd' or 'finite_difference', "
                             f"got {grad_method!r}")
        _checks.check_optional_positive("eps", eps)
        self.upper, self.lower = _check_bounds(upper, lower)
        if skip_unconverged and (tol is None or convergence != "residual"):
            raise ValueError("skip_unconverged=True needs a tolerance and "
                             "convergence='residual' (the test that decides convergence)")
        self.mu, self.n_iter, self.method = mu, n_iter, method
        self.grad_method, self.eps, self.tol, self.check_every = grad_method, eps, tol, check_every
        self.convergence, self.skip_unconverged = convergence, bool(skip_unconverged)
        self.v: Optional[List[torch.Tensor]] = None
        self.last_rho: Optional[torch.Tensor] = None
        self.last_eigenvalue: Optional[torch.Tensor] = None
        self.last_residual: Optional[torch.Tensor] = None
        self.last_converged: Optional[torch.Tensor] = None

    def get_extra_state(self):
        return {"v": self.v, "last_rho": self.last_rho}

    def set_extra_state(self, state):
        self.v, self.last_rho = state["v"], state["last_rho"]

    def forward(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
                ) -> torch.Tensor:
        params = _check_params(params)
        loss, grads = _gradients(loss_fn, params, create_graph=True)
        hvp = hvp_operator(grads, params)
        if self.v is not None and len(self.v) == len(params) and \
                all(a.shape == p.shape for a, p in zip(self.v, params)):
            v0 = [a.to(device=p.device, dtype=p.dtype) for a, p in zip(self.v, params)]
        else:
            v0 = _power.random_like(params)
        res = _iterate(hvp, v0, self.n_iter, self.tol, self.method, self.check_every,
                       self.convergence)
        v = res.vector
        self.v, self.last_rho = v, res.value
        if self.grad_method == "autograd":
            with torch.enable_grad():
                hv = hvp_operator(grads, params, create_graph=True)(v)
                q = _power.dot(v, hv)                       # v^T H v, differentiable (3rd order)
            lam, r = _power.residual(v, [h.detach() for h in hv])
            g, coef = penalty(lam, self.upper, self.lower)
            term = g + coef * (q - q.detach())              # value g, gradient dg/dlam * dq
        else:
            lam, r = _power.residual(v, hvp(v))
            lam = lam.detach()
            d3 = self._third_derivative_fd(loss_fn, params, v, [g.detach() for g in grads])
            # the perturbations bumped the parameters' versions, so the first graph cannot be
            # backpropagated any more: the loss is evaluated once more for the returned total
            del loss, grads, hvp
            with torch.enable_grad():
                loss = _check_loss(loss_fn())
            g, coef = penalty(lam, self.upper, self.lower)
            # value g; gradient dg/dlam * d3 (through the zero-valued surrogate)
            term = g + coef * sum(((p - p.detach()) * d).sum() for p, d in zip(params, d3))
        self.last_eigenvalue, self.last_residual = lam.detach(), r.detach()
        if self.tol is not None and self.convergence == "residual":
            self.last_converged = r.detach() <= self.tol
            if self.skip_unconverged:
                term = term * self.last_converged.to(term.dtype)
        else:
            self.last_converged = None
        return loss + self.mu * term

    def _third_derivative_fd(self, loss_fn, params, v, g0):
        eps = self.eps if self.eps is not None else torch.finfo(params[0].dtype).eps ** 0.25
        saved = [p.detach().clone() for p in params]
        out = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, s, d in zip(params, saved, v):
                        p.copy_(s + sign * eps * d)
                out.append(_gradients(loss_fn, params, create_graph=False)[1])
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return [(gp - 2 * g + gm) / eps ** 2 for gp, g, gm in zip(out[0], g0, out[1])]
