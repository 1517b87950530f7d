"""The exact spectral norm of the input-output Jacobian, per sample, as an estimator and as a
regularizer (Johansson et al., arXiv:2206.13581), and for comparison the Frobenius-norm Jacobian
regularizer, exact (K VJPs for K outputs: the regularizer that paper compares with) or by random
projections (Hoffman, Roberts & Yaida 2019).

    sig = jacobian.spectral_norm(model, x, n_iter=20)      # [B]: sigma_max(d model(x_i) / d x_i)
    reg = jacobian.JacobianSpectralNormRegularizer(lam=0.01)
    loss = loss + reg(model, x)                             # lam * mean_i sigma_i^2

sigma_max(J_i) is found by power iteration on J_i^T J_i for every sample of the batch at once:
J v by a JVP and J^T u by a VJP, both through one forward pass (the JVP as the derivative of a
VJP, "double backward").  It is exact at convergence, not a bound such as the product of the
layers' norms.  The model must treat samples independently (batch-norm in eval mode), so that
the Jacobian of the batch is block diagonal.

The regularizer follows the paper: with the singular vectors u_i, v_i held fixed,
sigma_i = u_i^T J_i v_i, whose gradient with respect to the parameters is taken by autograd.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _checks, _power

__all__ = ["spectral_norm", "spectral_norm_with_vectors", "jacobian_matrix", "frobenius_norm_sq",
           "frobenius_norm_sq_exact", "JacobianSpectralNormRegularizer",
           "JacobianFrobeniusRegularizer"]


def _check_input(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}; need a floating-point input")
    return x


def _forward(fn: Callable, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x with requires_grad, fn(x) with its graph, reshaped [B, outputs...])."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _power.twice_differentiable():
        y = fn(x)
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError("the model must return a tensor with the batch dimension first: got "
                         f"{getattr(y, 'shape', type(y).__name__)} for input {tuple(x.shape)}")
    if not y.requires_grad:
        raise ValueError("the model's output does not depend on its input (no gradient)")
    return x, y.reshape(y.shape[0], -1)


class JacobianOperators:
    """J v and J^T u for every sample, from one forward pass of fn at x."""

    def __init__(self, fn: Callable, x: torch.Tensor, forward=None):
        # forward: (x, y) of an earlier _forward(fn, x), to reuse its graph
        self.x, self.y = _forward(fn, x) if forward is None else forward
        with torch.enable_grad():
            # J^T w is linear in w: differentiating it with respect to w gives J v
            self.w = torch.zeros_like(self.y, requires_grad=True)
            (self.jtw,) = torch.autograd.grad(self.y, self.x, self.w, create_graph=True)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        (jv,) = torch.autograd.grad(self.jtw, self.w, v, retain_graph=True)
        return jv

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        (jtu,) = torch.autograd.grad(self.y, self.x, u, retain_graph=True)
        return jtu

    def jtj(self, v: List[torch.Tensor]) -> List[torch.Tensor]:
        return [self.vjp(self.jvp(v[0]))]

    def fixed_vector_sigma(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u_i^T J_i v_i for every sample, differentiable with respect to the model's
        parameters through the same forward pass (= sigma_i when u, v are the top singular
        vectors): the regularizers' term."""
        with torch.enable_grad():
            (jtu,) = torch.autograd.grad(self.y, self.x, u.detach(), create_graph=True)
        return (jtu * v.detach()).reshape(self.x.shape[0], -1).sum(1)


def _top_singular(ops: JacobianOperators, n_iter: int, v0: Optional[torch.Tensor],
                  tol: Optional[float], check_every: int):
    """(sigma, u, v, iterations) by power iteration on J^T J.  One output per sample makes J_i a
    row (rank 1): one iteration is then exact, and that is all that runs."""
    x = ops.x
    if v0 is None:
        v0 = _power.random_like([x], batched=True)[0]
    elif v0.shape != x.shape:
        raise ValueError(f"v0 has shape {tuple(v0.shape)}; need the input's {tuple(x.shape)}")
    if ops.y.shape[1] == 1:
        n_iter = 1
    res = _power.power_iteration(ops.jtj, [v0.detach().to(x)], n_iter, tol, check_every,
                                 batched=True)
    v = res.vector[0]
    u, sigma = _power.normalize([ops.jvp(v)], batched=True)
    return sigma.detach(), u[0].detach(), v, res.iterations


def spectral_norm_with_vectors(model: Callable, x: torch.Tensor, n_iter: int = 20,
                               v0: Optional[torch.Tensor] = None, tol: Optional[float] = None,
                               check_every: int = 5
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(sigma [B], u [B, outputs], v [B, *x.shape[1:]], iterations): the top singular value of
    each sample's Jacobian and its unit singular vectors (J_i v_i = sigma_i u_i).  v0 warm
    starts (shape of x); tol stops early (one host sync per check)."""
    x = _check_input(x)
    _checks.check_n_iter(n_iter)
    _checks.check_optional_positive("tol", tol)
    return _top_singular(JacobianOperators(model, x), n_iter, v0, tol, check_every)


def spectral_norm(model: Callable, x: torch.Tensor, n_iter: int = 20,
                  v0: Optional[torch.Tensor] = None, tol: Optional[float] = None,
                  check_every: int = 5) -> torch.Tensor:
    """sigma_max(d model(x_i) / d x_i) for every sample: a [B] tensor (no gradient)."""
    return spectral_norm_with_vectors(model, x, n_iter, v0, tol, check_every)[0]


class JacobianSpectralNormRegularizer(nn.Module):
    """``lam * mean_i sigma_max(J_i)^2`` with its gradient (singular vectors held fixed).

    ``forward(model, x, index=None)``: n_iter power iterations per sample, then the
    differentiable u^T J v.  With ``num_samples`` set and ``index`` given (the dataset indices
    of the batch), each sample's v is kept between calls (warm start; in the state_dict as extra
    state); otherwise v starts random each call, so n_iter should be larger.
    ``last_sigma`` holds the latest per-sample estimates.
    """

    def __init__(self, lam: float, n_iter: int = 10, num_samples: Optional[int] = None):
        super().__init__()
        lam = _checks.check_coefficient("lam", lam)
        _checks.check_n_iter(n_iter)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be None or a positive int, got {num_samples!r}")
        self.lam, self.n_iter, self.num_samples = lam, n_iter, num_samples
        self.vectors: Optional[torch.Tensor] = None
        self.last_sigma: Optional[torch.Tensor] = None

    def get_extra_state(self):
        return {"vectors": self.vectors}

    def set_extra_state(self, state):
        self.vectors = state["vectors"]

    def forward(self, model: Callable, x: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = _check_input(x)
        v0 = None
        if index is not None:
            if self.num_samples is None:
                raise ValueError("index was given but the regularizer has no num_samples: "
                                 "construct it with num_samples=len(dataset) to keep vectors")
            index = torch.as_tensor(index, device=x.device)
            if index.shape != x.shape[:1]:
                raise ValueError(f"index has shape {tuple(index.shape)}; need [{x.shape[0]}]")
            if self.vectors is None or self.vectors.shape[1:] != x.shape[1:]:
                self.vectors = _power.random_like(
                    [torch.empty((self.num_samples,) + x.shape[1:], dtype=x.dtype,
                                 device=x.device)], batched=True)[0]
            self.vectors = self.vectors.to(device=x.device, dtype=x.dtype)
            v0 = self.vectors[index]
        ops = JacobianOperators(model, x)      # one forward for the iterations and the term
        sigma, u, v, _ = _top_singular(ops, self.n_iter, v0, None, 1)
        if index is not None:
            self.vectors[index] = v
        self.last_sigma = sigma
        return self.lam * ops.fixed_vector_sigma(u, v).pow(2).mean()


def _rows(x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """[B, K, D]: row k of every sample's Jacobian is the VJP with the k-th unit vector (K
    backward passes through one forward; the samples are independent, so one VJP serves the
    whole batch)."""
    rows = []
    for k in range(y.shape[1]):
        e = torch.zeros_like(y)
        e[:, k] = 1
        with torch.enable_grad():
            (r,) = torch.autograd.grad(y, x, e, create_graph=create_graph,
                                       retain_graph=create_graph or k + 1 < y.shape[1])
        rows.append(r.reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def jacobian_matrix(model: Callable, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Every sample's Jacobian d model(x)_i / d x_i as a [B, K, D] tensor (K outputs, D inputs
    per sample), exactly, by K VJPs through one forward pass.  create_graph=True keeps it
    differentiable with respect to the model's parameters."""
    xr, y = _forward(model, _check_input(x))
    return _rows(xr, y, create_graph)


def frobenius_norm_sq_exact(model: Callable, x: torch.Tensor,
                            create_graph: bool = False) -> torch.Tensor:
    """||J_i||_F^2 per sample, exactly (K VJPs for K outputs): the exact Frobenius-norm
    regularizer that arXiv:2206.13581 compares the spectral norm with."""
    return jacobian_matrix(model, x, create_graph).pow(2).sum((1, 2))


def frobenius_norm_sq(model: Callable, x: torch.Tensor, n_proj: int = 1,
                      create_graph: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Unbiased random-projection estimate of ||J_i||_F^2 per sample (Hoffman et al. 2019):
    C * mean over n_proj unit vectors e uniform on the output sphere of ||J_i^T e||^2, with C the
    number of outputs.  create_graph=True makes it differentiable with respect to the
    parameters (the regularizer)."""
    x = _check_input(x)
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive int, got {n_proj!r}")
    xr, y = _forward(model, x)
    total = 0
    for k in range(n_proj):
        e = _power.random_like([y.detach()], batched=True, generator=generator)[0]
        with torch.enable_grad():
            (jte,) = torch.autograd.grad(y, xr, e, create_graph=create_graph,
                                         retain_graph=create_graph or k + 1 < n_proj)
        total = total + jte.reshape(x.shape[0], -1).pow(2).sum(1)
    return y.shape[1] * total / n_proj


class JacobianFrobeniusRegularizer(nn.Module):
    """``lam * mean_i ||J_i||_F^2``: the baseline that the exact spectral norm regularizer is
    compared with.  ``exact=True``: the exact norm (K VJPs per batch for K outputs, as
    arXiv:2206.13581 compares it); ``exact=False``: the unbiased estimate with n_proj random
    projections per sample (Hoffman et al. 2019)."""

    def __init__(self, lam: float, n_proj: int = 1, exact: bool = False):
        super().__init__()
        if not isinstance(n_proj, int) or n_proj < 1:
            raise ValueError(f"n_proj must be a positive int, got {n_proj!r}")
        self.lam, self.n_proj = _checks.check_coefficient("lam", lam), n_proj
        self.exact = bool(exact)

    def forward(self, model: Callable, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return self.lam * frobenius_norm_sq_exact(model, x, create_graph=True).mean()
        return self.lam * frobenius_norm_sq(model, x, self.n_proj, create_graph=True).mean()
